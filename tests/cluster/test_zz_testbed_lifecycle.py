"""Runs last: the test bed recovers from a killed run and `down` leaves nothing behind."""

import contextlib
import os
import signal
import subprocess

import psutil
import pytest

from tests.conftest import TESTBED

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
    assert st.stdout.count(" idle ") >= testbed.nodes


def test_down_leaves_nothing(testbed):
    r = subprocess.run([TESTBED, "down"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert namespaces() == []
    assert links() == []
    leftovers = [p for p in bed_processes() if p.split(":")[1] in DAEMONS]
    assert leftovers == []
    # Nothing of a cluster may survive anywhere on the machine either.
    strays = [
        p.info["name"]
        for p in psutil.process_iter(["name"])
        if p.info["name"] in ("slurmd", "slurmctld", "slurmstepd", "raylet", "gcs_server")
    ]
    assert strays == []
    again = subprocess.run([TESTBED, "down"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
