"""Start a Ray worker process with modules imported first: Ray Train's workers run through this
(the `py_executable` of their runtime env, raybridge.train.make_trainer), so that a worker process
the node keeps warm (agent/warm.py) has torch and Ray Train imported before a worker group needs it.

    python -P -m raybridge.preload MOD[,MOD...] WORKER_SCRIPT [ARG ...]

imports each module (one that fails is left to the worker, with one line on stderr), then runs
WORKER_SCRIPT as `python WORKER_SCRIPT ARG ...` would: as __main__, its own folder first on sys.path.
`-P`: nothing from the worker's working directory is imported in its place.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys


def command(python: str, modules: tuple[str, ...]) -> str:
    """The py_executable for workers that import `modules` first."""
    import shlex

    return shlex.join([python, "-P", "-m", "raybridge.preload", ",".join(modules)])


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -P -m raybridge.preload MOD[,MOD...] WORKER_SCRIPT [ARG ...]")
    modules, script, args = argv[0], argv[1], argv[2:]
    for name in filter(None, modules.split(",")):
        try:
            importlib.import_module(name)
        except Exception as e:  # the worker imports it again when it needs it, and fails there
            print(f"raybridge.preload: {name} not imported ({type(e).__name__}: {e})", file=sys.stderr)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
