"""Runs last: the test bed recovers from a killed run and `down` leaves nothing behind."""

import contextlib
import os
import signal
import subprocess

import psutil
import pytest

from tests.cluster.bed import TESTBED

pytestmark = pytest.mark.cluster
ROOT = os.environ.get("RBTB_ROOT", "/srv/rbtb")
DAEMONS = ("slurmd", "slurmctld", "munged", "sshd", "sleep", "slurmstepd", "raylet", "gcs_server")


def bed_processes():
    """Processes the test bed started: anything inside its namespaces or naming its state folder."""
    found = []
    netns = set(namespaces())
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            ns = os.readlink(f"/proc/{p.pid}/ns/net")
        except (psutil.Error, OSError):
            continue
        if f"{ROOT}/state" in cmd or (netns and ns in netns_inodes()):
            found.append(f"{p.pid}:{p.info['name']}")
    return found


def namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("rbtb-")]


def netns_inodes():
    inodes = set()
    for ns in namespaces():
        with contextlib.suppress(OSError):
            inodes.add(f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]")
    return inodes


def processes_in(inodes: set[str]) -> list[str]:
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if os.readlink(f"/proc/{p.pid}/ns/net") in inodes:
                found.append(f"{p.pid}:{p.info['name']}")
        except OSError:
            continue
    return found


def links():
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(": ")[1] for line in out.splitlines() if ": rbtb" in line]


def test_up_is_idempotent(testbed):
    r = subprocess.run([TESTBED, "up"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "already running" in r.stderr


def test_up_recovers_from_a_killed_run(testbed):
    victims = [psutil.Process(int(v.split(":")[0])) for v in bed_processes()]
    assert victims
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)  # namespaces, bridges, pid files and mounts stay behind
    assert namespaces() and links()
    r = subprocess.run([TESTBED, "up"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    st = subprocess.run([TESTBED, "status"], capture_output=True, text=True)
    assert st.returncode == 0, st.stdout
    assert node_states(st.stdout, "debug") == {f"n{i}": "idle" for i in range(1, testbed.nodes + 1)}


def node_states(status: str, partition: str) -> dict[str, str]:
    """`testbed status` lists `sinfo -N` rows (NODE PARTITION STATE CPUS): one per node and partition."""
    rows = [line.split() for line in status.splitlines()]
    return {r[0]: r[2] for r in rows if len(r) == 4 and r[1].rstrip("*") == partition}


def test_down_leaves_nothing(testbed):
    inodes = netns_inodes()
    assert inodes
    r = subprocess.run([TESTBED, "down"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert namespaces() == []
    assert links() == []
    # Whatever ran in the bed's namespaces (a daemon, an agent, a renamed Ray worker) holds one of
    # them for as long as it lives: nothing may.
    assert processes_in(inodes) == []
    assert [p for p in bed_processes() if p.split(":")[1] in DAEMONS] == []
    # Nothing of a cluster may survive anywhere on the machine either.
    strays = [
        p.info["name"]
        for p in psutil.process_iter(["name"])
        if p.info["name"] in ("slurmd", "slurmctld", "slurmstepd", "raylet", "gcs_server")
    ]
    assert strays == []
    again = subprocess.run([TESTBED, "down"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
