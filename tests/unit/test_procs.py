"""Teardown against real processes: what a parent starts while it shuts down is stopped too."""

import os
import subprocess
import sys
import uuid

import psutil
import pytest

from raybridge.agent import procs

# On SIGTERM, start a child that ignores SIGTERM in its own session (so it leaves our tree, like an
# orphan of a dying Ray process), print its pid, then exit.
RESPAWNS_ON_TERM = """
import signal, subprocess, sys, time
def on_term(*_):
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
        start_new_session=True,
    )
    print(child.pid, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""
IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def start(job: str, code: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", code], env=os.environ | {procs.MARKER: job}, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout and p.stdout.readline().strip() == "ready"
    return p


def running(children: list[subprocess.Popen[str]]) -> list[psutil.Process]:
    return [psutil.Process(p.pid) for p in children if p.poll() is None]


def gone(pid: int) -> bool:
    """Exited (a zombie counts: who collects an orphan's status is up to the system's init)."""
    try:
        return not procs.live([psutil.Process(pid)])
    except psutil.NoSuchProcess:
        return True


def finder(job: str, children: list[subprocess.Popen[str]]):
    return lambda: running(children) + procs.marked(job)


@pytest.mark.parametrize("rounds", [1, 5])
def test_stop_also_stops_what_appears_during_shutdown(rounds):
    job = f"test-{uuid.uuid4().hex}"
    parent, stubborn = start(job, RESPAWNS_ON_TERM), start(job, IGNORES_TERM)
    try:
        left = procs.stop(finder(job, [parent, stubborn]), grace=0.5, rounds=rounds)
        late = int(parent.stdout.readline())  # the child it started on SIGTERM
        assert gone(stubborn.pid)  # ignored SIGTERM: killed after the grace period
        if rounds == 1:  # a single pass (what `ray stop` does) misses the late child
            assert left == [f"{late}:{psutil.Process(late).name()}"]
            assert [p.pid for p in procs.marked(job)] == [late]
        else:
            assert left == [] and gone(late)
            assert procs.marked(job) == []
    finally:
        for p in procs.marked(job):
            p.kill()


# Takes a process name, logs it on SIGTERM and exits; the stopping order shows in the log.
NAMED = """
import signal, sys, time
name, log = sys.argv[1], sys.argv[2]
open("/proc/self/comm", "w").write(name)
def on_term(*_):
    open(log, "a").write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_follows_the_order_by_name(tmp_path):
    log = tmp_path / "stopped"
    names = ["gcs_server", "dashboard", "raylet", "monitor"]
    children = []
    for n in names:
        p = subprocess.Popen([sys.executable, "-c", NAMED, n, str(log)], stdout=subprocess.PIPE, text=True)
        assert p.stdout and p.stdout.readline().strip() == "ready"
        children.append(p)
    left = procs.stop(lambda: running(children), grace=5, first={"raylet"}, last={"gcs_server"})
    assert left == []
    stopped = log.read_text().split()
    assert stopped[0] == "raylet" and stopped[-1] == "gcs_server"
    assert sorted(stopped[1:3]) == ["dashboard", "monitor"]
