"""The batch driver's launcher: a Python program runs in process exactly as `python` would run it,
anything else is exec'd, and nothing runs before every node is alive. Real subprocesses; the job
folder is written here the way the head agent writes it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from raybridge import jobdir as jd
from raybridge.agent import driver

PY = sys.executable


def test_in_process_only_for_this_interpreter_with_a_script_or_module():
    assert driver.in_process([PY, "train.py", "--lr", "1"]) == driver.Program(
        "script", "train.py", ["--lr", "1"]
    )
    assert driver.in_process([PY, "-u", "-m", "pkg.mod", "-x"]) == driver.Program(
        "module", "pkg.mod", ["-x"], True
    )
    for cmd in ([PY, "-c", "print(1)"], [PY, "-W", "error", "t.py"], [PY], [PY, "-m"], ["bash", "t.py"]):
        assert driver.in_process(cmd) is None, cmd
    assert driver.in_process(["/usr/bin/env", "python", "t.py"]) is None


def test_same_interpreter_means_same_folder_and_same_file(tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python3").symlink_to(os.path.realpath(PY))
    (venv / "python").symlink_to("python3")
    assert driver.same_interpreter(str(venv / "python"), str(venv / "python3"))
    # The system interpreter is the same file but another environment (another site-packages).
    assert not driver.same_interpreter(os.path.realpath(PY), str(venv / "python3"))
    assert not driver.same_interpreter("bash", PY)


@pytest.mark.parametrize(
    ("source", "early"),
    [
        ("import ray\nray.init()", ["ray"]),
        (
            '"""doc"""\nfrom __future__ import annotations\nimport os, json\nfrom ray import train\n',
            ["os", "json", "ray"],
        ),
        ("import ray.train.torch\nfrom torch import nn\nx = 1\nimport numpy\n", ["ray.train.torch", "torch"]),
        ("import os\nos.environ['RAY_DEDUP_LOGS'] = '0'\nimport ray\n", ["os"]),
        ("from . import ray\n", []),
        ("import helpers, ray\nfrom helpers.x import y\n", ["ray"]),  # the program's own helpers.py
        ("def f(:\n", []),
        ("", []),
    ],
)
def test_only_the_programs_leading_imports_are_done_early_and_never_its_own_modules(tmp_path, source, early):
    (tmp_path / "helpers.py").write_text("")
    assert driver.early_imports(source, str(tmp_path)) == early


def test_a_module_that_cannot_be_imported_early_is_left_to_the_program():
    assert driver.import_early(["json", "no_such_module_here", "os.path"]) == ["json", "os.path"]


def job_env(tmp_path: Path) -> dict[str, str]:
    shared = tmp_path / "shared"
    (shared / "jobs" / "77").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYBRIDGE_", "SLURM_"))}
    env |= {"RAYBRIDGE_SHARED_DIR": str(shared), "SLURM_JOB_ID": "77", "RAYBRIDGE_READY_TIMEOUT": "30"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def cluster(tmp_path: Path, alive: bool, state: str = "starting") -> None:
    folder = jd.JobDir(str(tmp_path / "shared" / "jobs" / "77"))
    Path(folder.path).mkdir(parents=True, exist_ok=True)
    jd.write(
        folder.cluster,
        jd.ClusterRecord(
            job_id="77",
            state=state,
            expected_nodes=2,
            job_dir=folder.path,
            address="10.0.0.1:6379",
            nodes_alive_at=time.time() if alive else None,
            error="boom" if state == "failed" else None,
        ),
    )


def launch(
    tmp_path: Path, *command: str, cwd: Path | None = None, agents: str = "", standby: str = ""
) -> subprocess.Popen:
    head = [agents] if agents else ["--standby", standby] if standby else []
    argv = [PY, "-P", "-m", "raybridge.agent", "driver", *head, "--", *command]
    return subprocess.Popen(
        argv,
        cwd=cwd or tmp_path,
        env=job_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


PROBE = textwrap.dedent(
    """
    import json, os, sys
    print(json.dumps({
        "argv": sys.argv, "name": __name__, "main_is_me": sys.modules["__main__"].__dict__ is globals(),
        "path0": sys.path[0], "address": os.environ.get("RAY_ADDRESS"),
        "job_dir": os.environ.get("RAYBRIDGE_JOB_DIR"), "auth": os.environ.get("RAY_AUTH_MODE"),
        "token": os.environ.get("RAY_AUTH_TOKEN_PATH"), "ray_loaded": "ray" in sys.modules,
        "line_buffered": sys.stdout.line_buffering,
        # What the cluster record said when the program started (the driver must wait for the nodes).
        "alive_at_start": json.load(open(os.path.join(os.environ["RAYBRIDGE_JOB_DIR"], "cluster.json"))).get(
            "nodes_alive_at"
        ),
    }))
    code = int(sys.argv[-1])
    if code == 99:
        raise ValueError("from the program")
    sys.exit(code)
    """
)


def test_a_script_runs_in_process_as_python_would_once_the_nodes_are_alive(tmp_path):
    sub = tmp_path / "proj"
    sub.mkdir()
    (sub / "probe.py").write_text("import ray\n" + PROBE)
    cluster(tmp_path, alive=False)
    p = launch(tmp_path, PY, "proj/probe.py", "it's a; $(x)", "3")
    time.sleep(1.5)  # the window in which a driver that does not wait would start the program
    assert p.poll() is None  # not before every node is alive
    cluster(tmp_path, alive=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, err
    seen = json.loads(out)
    assert seen["argv"] == ["proj/probe.py", "it's a; $(x)", "3"]
    assert seen["name"] == "__main__" and seen["main_is_me"]
    assert seen["path0"] == str(sub)
    assert seen["address"] == "10.0.0.1:6379"
    assert seen["job_dir"] == str(tmp_path / "shared" / "jobs" / "77")
    assert seen["auth"] == "token" and seen["token"].endswith("/jobs/77/token")
    assert seen["ray_loaded"] and seen["line_buffered"]
    assert seen["alive_at_start"] is not None  # it started only once the head had recorded every node
    assert "running (in process, imported early: ray, json, os, sys)" in err


def test_an_uncaught_exception_prints_the_programs_traceback_and_exits_1(tmp_path):
    (tmp_path / "probe.py").write_text("import os\nos.environ['X'] = '1'\n" + PROBE)
    cluster(tmp_path, alive=True)
    p = launch(tmp_path, PY, "probe.py", "99")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert not json.loads(out)["ray_loaded"]  # the program sets variables first: no early import
    tb = err[err.index("Traceback") :]
    assert 'File "' in tb and "probe.py" in tb and "ValueError: from the program" in tb
    assert "runpy" not in tb and "driver.py" not in tb


def test_a_module_runs_with_dash_m_semantics(tmp_path):
    (tmp_path / "probemod.py").write_text(PROBE)
    cluster(tmp_path, alive=True)
    p = launch(tmp_path, PY, "-m", "probemod", "0")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    seen = json.loads(out)
    assert seen["argv"][0].endswith("probemod.py") and seen["argv"][1:] == ["0"]
    assert seen["name"] == "__main__" and seen["path0"] == str(tmp_path)


def test_other_commands_run_as_a_child_with_the_drivers_environment(tmp_path):
    cluster(tmp_path, alive=True)
    p = launch(tmp_path, "bash", "-c", 'echo "$RAY_ADDRESS $PYTHONUNBUFFERED"; exit 5')
    out, err = p.communicate(timeout=30)
    assert p.returncode == 5 and out == "10.0.0.1:6379 1\n", err
    assert "running (child process)" in err


def test_sigint_kills_the_program_as_it_would_kill_python(tmp_path):
    (tmp_path / "sleepy.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    cluster(tmp_path, alive=True)
    p = launch(tmp_path, PY, "sleepy.py")
    assert p.stdout.readline() == "up\n"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGINT and "KeyboardInterrupt" in err


@pytest.mark.parametrize("how", ["failed", "agents-gone"])
def test_no_driver_when_the_cluster_fails_first(tmp_path, how):
    (tmp_path / "marker.py").write_text("open('RAN', 'w').close()\n")
    if how == "failed":
        cluster(tmp_path, alive=False, state="failed")
        p = launch(tmp_path, PY, "marker.py")
    else:
        cluster(tmp_path, alive=False)
        gone = subprocess.Popen(["true"])
        gone.wait()
        p = launch(tmp_path, PY, "marker.py", agents=str(gone.pid))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert ("cluster failed: boom" if how == "failed" else "srun step ended") in err
    assert "the driver did not run" in err and not (tmp_path / "RAN").exists()


def test_output_is_line_buffered_when_piped(tmp_path):
    (tmp_path / "talk.py").write_text("import time\nprint('first')\ntime.sleep(30)\n")
    cluster(tmp_path, alive=True)
    p = launch(tmp_path, PY, "talk.py")
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(p.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=20)
    p.kill()
    p.communicate()
    assert got == ["first\n"]


def test_follow_output_reads_only_new_bytes_and_everything_before_the_end(tmp_path):
    """The CLI side of the driver's output: incremental reads, a character split between two writes
    kept whole, and what was written before Slurm reported the end is not lost."""
    from raybridge.client.cluster import Cluster
    from raybridge.slurm import JobInfo
    from raybridge.transport.runner import LocalRunner

    log = tmp_path / "job.out"
    reads: list[int] = []

    class Counting(LocalRunner):
        def read_from(self, path, offset, size):
            reads.append(offset)
            return super().read_from(path, offset, size)

    finished = threading.Event()

    class Job(Cluster):
        def job(self):
            state = "COMPLETED" if finished.is_set() else "RUNNING"
            return JobInfo("1", "x", state, "None", "n1", str(log), 0, "raybridge")

    def writer():
        with open(log, "wb") as f:
            for chunk in (b"one\n", b"caf\xc3", b"\xa9\n", b"last\n"):
                f.write(chunk)
                f.flush()
                time.sleep(0.3)
        finished.set()

    threading.Thread(target=writer, daemon=True).start()
    got: list[str] = []
    job = Job(Counting(), "1", str(tmp_path)).follow_output(got.append)
    assert job.finished and "".join(got) == "one\ncafé\nlast\n"
    assert reads == sorted(reads) and max(reads) <= len("one\ncafé\nlast\n".encode())


@pytest.mark.parametrize("how", ["in-process", "child"])
def test_a_lost_head_stops_the_program_and_asks_for_a_restart(tmp_path, how):
    """The new head bumps the generation: the launcher ends the program (whatever it is doing) and
    exits with the restart flag set, so that the batch script starts it again."""
    (tmp_path / "forever.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    cluster(tmp_path, alive=True)
    command = [PY, "forever.py"] if how == "in-process" else ["bash", "-c", "echo up; sleep 120"]
    p = launch(tmp_path, *command)
    assert p.stdout.readline() == "up\n"
    folder = jd.JobDir(str(tmp_path / "shared" / "jobs" / "77"))
    rec = jd.read(folder.cluster, jd.ClusterRecord)
    lost = {"at": time.time(), "event": "head_lost", "node": "n2", "detail": ""}
    jd.write(folder.cluster, rec.with_changes(generation=1, state="recovering", events=(lost,)))
    _, err = p.communicate(timeout=30)
    assert p.returncode == driver.RESTART, err
    assert "the Ray head n2 was lost" in err
    assert Path(folder.driver_restart).exists()
    assert not Path(folder.driver_exit).exists()  # the program did not end: it runs again


def lose_head(tmp_path: Path, new_head: str, alive: bool = True) -> jd.JobDir:
    """What the agents write when `new_head` took over (generation 1) and, if alive, its nodes are in."""
    folder = jd.JobDir(str(tmp_path / "shared" / "jobs" / "77"))
    rec = jd.read(folder.cluster, jd.ClusterRecord)
    head = jd.HeadRecord(
        ip="10.0.0.3", hostname=new_head, interface="ib0", ports={"gcs": 6379}, gcs_up_at=1.0
    )
    jd.write(folder.head, dataclasses.replace(head, generation=1))
    jd.write(
        folder.cluster,
        rec.with_changes(
            generation=1,
            state="recovering",
            address="10.0.0.3:6379",
            nodes_alive_at=time.time() if alive else None,
        ),
    )
    return folder


def test_a_standby_runs_the_program_when_its_node_is_the_new_head(tmp_path):
    """Its imports done once the cluster is ready; the program runs the moment the new head's nodes are
    alive, and its exit code is the job's."""
    from raybridge.agent import netinfo

    (tmp_path / "probe.py").write_text(PROBE)
    cluster(tmp_path, alive=True, state="ready")
    p = launch(tmp_path, PY, "probe.py", "5", standby="0")
    deadline = time.time() + 30
    while "standing by on" not in (line := p.stderr.readline()) and time.time() < deadline:
        pass
    assert f"standing by on {netinfo.short_hostname()} " in line and "imported early: json, os, sys" in line
    time.sleep(0.5)
    assert p.poll() is None  # the head is not lost: it waits
    folder = lose_head(tmp_path, netinfo.short_hostname(), alive=False)
    time.sleep(1)
    assert p.poll() is None  # the new head's nodes are not alive yet
    lose_head(tmp_path, netinfo.short_hostname())
    out, err = p.communicate(timeout=30)
    assert p.returncode == 5, err
    seen = json.loads(out)
    assert seen["address"] == "10.0.0.3:6379" and seen["alive_at_start"] and seen["ray_loaded"] is False
    assert "the standby takes over" in err
    assert Path(folder.driver_exit).read_text() == "5\n"


@pytest.mark.parametrize("how", ["another-head", "stopped", "driver-ended"])
def test_a_standby_that_is_not_needed_ends_without_running_anything(tmp_path, how):
    (tmp_path / "probe.py").write_text(PROBE)
    cluster(tmp_path, alive=True, state="ready")
    p = launch(tmp_path, PY, "probe.py", "5", standby="0")
    folder = jd.JobDir(str(tmp_path / "shared" / "jobs" / "77"))
    if how == "another-head":
        lose_head(tmp_path, "some-other-node")
    elif how == "stopped":
        jd.write(folder.cluster, jd.read(folder.cluster, jd.ClusterRecord).with_changes(state="stopped"))
    else:
        Path(folder.driver_exit).write_text("0\n")  # the driver's program ended: the job ends
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out == "", err
    assert ("not this node" in err) == (how == "another-head")
    assert how == "driver-ended" or not Path(folder.driver_exit).exists()


def test_a_child_that_dies_of_a_signal_takes_the_launcher_with_it(tmp_path):
    cluster(tmp_path, alive=True)
    p = launch(tmp_path, "bash", "-c", "kill -TERM $$")
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM
