"""Does this Python run raybridge and Ray, with the versions the submitting raybridge runs?

Run by the batch script before anything starts (`python -m raybridge.envcheck`) and by every node's
agent. It imports only the standard library at module level, so that a node whose Python lacks
raybridge's dependencies gets one line naming the missing module, not a traceback. The CLI finds
that line in the job's output (ERROR_MARK) and shows it as the reason `up` failed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import sys

ERROR_MARK = "raybridge-error: "
VERSIONS_VAR = "RAYBRIDGE_VERSIONS"  # "raybridge=0.1.0 ray=2.60.0 python=3.11": what the submitter runs
NEEDED = ("psutil", "ray")  # found, not imported: importing Ray here would fix its auth mode early
FIX = (
    "make the nodes use the same environment as raybridge on the login node: set `python:` in the "
    "profile to that environment's interpreter on shared storage (e.g. /path/to/venv/bin/python), or "
    "`setup:` lines that activate it"
)


CONTAINER_VAR = "RAYBRIDGE_CONTAINER"  # "runtime:image" when the job runs in a container
CONTAINER_FIX = (
    "the image must carry raybridge, Ray and Python of the login node's versions (rebuild it with them), "
    "or set `python:` to an environment on shared storage that container.mounts mounts"
)


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(full: bool = True) -> dict[str, str]:
    """What this interpreter runs. full=False: raybridge's version only (a laptop's Ray and Python
    may differ from the cluster's; raybridge's records may not)."""
    from raybridge import __version__

    out = {"raybridge": __version__}
    if full:
        out["ray"] = dist_version("ray") or "none"
        out["python"] = "{}.{}".format(*sys.version_info[:2])
    return out


def encode(v: dict[str, str]) -> str:
    return " ".join(f"{k}={val}" for k, val in v.items())


def decode(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def problem(expected: str | None) -> str | None:
    """Why this Python cannot run the job's agents, in one line, or None."""
    where = f"{socket.gethostname().split('.')[0]}: {sys.executable}"
    fix = FIX
    if image := os.environ.get(CONTAINER_VAR):
        where, fix = f"{where} in the container {image.partition(':')[2]}", CONTAINER_FIX
    for module in NEEDED:
        if importlib.util.find_spec(module) is None:
            return f"{where} cannot import {module} (No module named {module!r}); {fix}"
    if expected:
        want = decode(expected)
        have = versions()
        diff = [f"{k} {have.get(k, 'none')} (login node: {v})" for k, v in want.items() if have.get(k) != v]
        if diff:
            return f"{where} runs {', '.join(diff)}; {fix}"
    return None


def main() -> int:
    why = problem(os.environ.get(VERSIONS_VAR))
    if why:
        print(ERROR_MARK + why, flush=True)
        return 3
    v = versions()
    print(f"raybridge: environment ok: {sys.executable}, Python {v['python']}, Ray {v['ray']}", flush=True)
    return 0


def find_error(output: str, python: str | None = None, image: str | None = None) -> str | None:
    """The first raybridge-error line of a job's output; or Python's own line when it could not even
    find raybridge (`python -m raybridge.envcheck` with no raybridge installed); or the shell's when
    the interpreter itself is missing on the node. image: the job's container image, if any."""
    fix = f"in the container {image}: {CONTAINER_FIX}" if image else FIX
    for line in output.splitlines():
        if line.startswith(ERROR_MARK):
            return line[len(ERROR_MARK) :].strip()
        if "No module named 'raybridge'" in line or "module specification for 'raybridge" in line:
            return f"the job's Python cannot import raybridge ({line.strip()[:200]}); {fix}"
        if line.startswith("Unknown option: -P"):  # raybridge runs its modules with -P (Python >= 3.11)
            return f"the job's Python {python or 'python3'} is older than 3.11 (it has no -P option); {fix}"
        if "execve(): " in line and "No such file" in line:  # srun: a program missing on a node
            program = line.split("execve(): ", 1)[1].split(":", 1)[0]
            return (
                f"{program} is not installed on every node of the job ({line.strip()[:200]}); install it "
                "there, or set the profile's python/container for what the nodes have"
            )
        if python and python in line and ("No such file" in line or "command not found" in line):
            return f"the job's Python {python} is not there on the node ({line.strip()[:200]}); {fix}"
    return None


if __name__ == "__main__":
    sys.exit(main())
