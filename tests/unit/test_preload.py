"""raybridge.preload: a Ray worker started with modules imported first, as `python SCRIPT ARGS` would
run it otherwise; and the runtime env raybridge.train.make_trainer gives Ray Train's workers."""

import shlex
import subprocess
import sys

from raybridge import train
from raybridge.preload import command


def test_the_worker_script_runs_as_python_would_after_the_modules(tmp_path):
    folder = tmp_path / "workers"
    folder.mkdir()
    (folder / "sibling.py").write_text("WHERE = 'next to the script'\n")
    script = folder / "default_worker.py"
    script.write_text(
        "import sys, sibling\n"
        "print(__name__, sys.argv[1:], sibling.WHERE, 'json' in sys.modules, 'colorsys' in sys.modules)\n"
    )
    # The working directory holds a module named like one the worker imports: never imported (-P).
    (tmp_path / "colorsys.py").write_text("raise SystemExit('imported from the working directory')\n")
    argv = shlex.split(command(sys.executable, ("json", "colorsys", "no_such_module_here")))
    r = subprocess.run(
        [*argv, str(script), "--node-ip-address=1.2.3.4", "a b"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.split("\n")[0]
        == "__main__ ['--node-ip-address=1.2.3.4', 'a b'] next to the script True True"
    )
    assert r.stderr.splitlines() == [
        "raybridge.preload: no_such_module_here not imported (ModuleNotFoundError: No module named 'no_such_module_here')"
    ]


def test_make_trainers_workers_start_through_it_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("RAYBRIDGE_PRELOAD", raising=False)
    exe = train.worker_runtime_env()["py_executable"]
    assert shlex.split(exe) == [
        sys.executable,
        "-P",
        "-m",
        "raybridge.preload",
        "ray.train.torch,torch._dynamo",
    ]
    monkeypatch.setenv("RAYBRIDGE_PRELOAD", "torch")  # the profile's `preload`, exported by the script
    assert shlex.split(train.worker_runtime_env()["py_executable"])[-1] == "torch"
    monkeypatch.setenv("RAYBRIDGE_PRELOAD", "")
    assert train.worker_runtime_env() == {}  # preload: []: Ray starts them as it does
    assert train.worker_runtime_env(("a.b",))["py_executable"].endswith("raybridge.preload a.b")
