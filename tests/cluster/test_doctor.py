"""`raybridge doctor` on the real test bed: passes when healthy; each condition, broken for real on one
node (or between two), yields exactly its own failing check, naming the node, with its fix."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.cluster.bed import PYTHON, TESTBED, as_user, node_namespaces, processes_in

pytestmark = pytest.mark.cluster
NODES = "4"  # every node of the test bed: the broken one is always in the doctor's step


def doctor(testbed, profile=None, *extra):
    r = testbed.raybridge(
        "login", "doctor", "--profile", profile or testbed.local_profile, "--nodes", NODES, "--json", *extra
    )
    checks = json.loads(r.stdout) if r.stdout.strip().startswith("[") else None
    assert checks is not None, r.stderr[-2000:]
    return r.returncode, checks


def failing(checks):
    return {(c["check"], c["node"]) for c in checks if c["status"] == "fail"}


def only_failure(checks, check, node):
    assert failing(checks) == {(check, node)}, [c for c in checks if c["status"] != "pass"]
    (c,) = [c for c in checks if c["status"] == "fail"]
    assert c["fix"], c
    return c


def sh(host, *cmd):
    """As root: the bed's administrator breaks the node."""
    subprocess.run([TESTBED, "exec", host, "--", *cmd], check=True, capture_output=True, timeout=60)


def test_a_healthy_test_bed_passes(testbed):
    rc, checks = doctor(testbed)
    assert rc == 0 and not failing(checks), checks
    names = {c["check"] for c in checks}
    assert {"shared storage", "interface", "ports", "/dev/shm", "resources", "NCCL/GLOO", "versions"} <= names
    assert {"temp dir", "token auth", "fabric"} <= names
    assert len([c for c in checks if c["check"] == "fabric"]) == 6  # every pair of the 4 nodes
    text = testbed.raybridge("login", "doctor", "--profile", testbed.local_profile, "--nodes", "2")
    assert text.returncode == 0 and "0 failed" in text.stdout, text.stdout + text.stderr
    # From the laptop: the same step, started over SSH on the login node.
    remote = testbed.raybridge(
        "laptop", "doctor", "--profile", testbed.remote_profile, "--nodes", "2", "--json"
    )
    assert remote.returncode == 0, remote.stderr[-2000:]
    checks = json.loads(remote.stdout)
    assert not failing(checks) and len([c for c in checks if c["check"] == "fabric"]) == 1


def test_interface_down_on_one_node(testbed):
    sh("n3", "ip", "link", "set", "ib0", "down")
    try:
        rc, checks = doctor(testbed)
    finally:
        sh("n3", "ip", "link", "set", "ib0", "up")
    assert rc == 1
    c = only_failure(checks, "interface", "n3")
    assert "eth0" in c["detail"] and "ib0" in c["fix"]


def test_a_port_of_the_block_held_on_one_node(testbed):
    # Whatever job id the doctor's step gets, the first port of its block is taken on n4.
    hold = (
        "import socket, time\nfrom raybridge.agent import ports\nheld = []\n"
        "for i in range(ports.blocks()):\n"
        "    s = socket.socket(); s.bind(('', ports.plan_for_block(i).gcs)); s.listen(); held.append(s)\n"
        "print('holding', flush=True)\ntime.sleep(600)\n"
    )
    p = subprocess.Popen(as_user("n4", PYTHON, "-c", hold), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        rc, checks = doctor(testbed)
    finally:
        p.kill()
        p.wait()
    assert rc == 1
    c = only_failure(checks, "ports", "n4")
    assert "(gcs) held by pid" in c["detail"] and "python" in c["detail"], c


def test_an_overlong_temp_path_is_refused_by_doctor_and_up_alike(testbed):
    profile = Path(testbed.shared) / "long-tmp.yaml"
    testbed.write(profile, Path(testbed.local_profile).read_text() + "node_tmp: /tmp/" + "x" * 36 + "\n")
    rc, checks = doctor(testbed, str(profile), "--login-only")
    assert rc == 1
    c = only_failure(checks, "temp dir", "login")
    before = testbed.squeue_ids()
    up = testbed.raybridge("login", "up", "--nodes", "2", "--profile", str(profile))
    assert up.returncode != 0
    assert up.stderr.strip().splitlines() == [
        f"raybridge: error: temp dir on login: {c['detail']}; fix: {c['fix']}"
    ]
    assert testbed.squeue_ids() == before  # nothing was submitted


def test_shared_storage_read_only_on_one_node(testbed):
    shared = str(testbed.shared_dir)
    testbed.exec("login", "mkdir", "-p", shared, check=True)
    sh("n2", "mount", "--bind", shared, shared)
    try:
        sh("n2", "mount", "-o", "remount,bind,ro", shared)
        rc, checks = doctor(testbed)
    finally:
        sh("n2", "umount", shared)
    assert rc == 1
    c = only_failure(checks, "shared storage", "n2")
    assert "Read-only file system" in c["detail"], c


def test_fabric_unreachable_between_two_nodes(testbed):
    sh("n1", "ip", "route", "add", "blackhole", "10.212.0.12/32")
    try:
        rc, checks = doctor(testbed)
    finally:
        sh("n1", "ip", "route", "del", "blackhole", "10.212.0.12/32")
    assert rc == 1
    c = only_failure(checks, "fabric", "n1↔n2")
    assert "n1→n2" in c["detail"]


def test_the_doctor_leaves_nothing_behind(testbed):
    r = testbed.raybridge("login", "doctor", "--profile", testbed.local_profile, "--nodes", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert not list((testbed.shared_dir / "doctor").iterdir())
    left = [
        f"{ns}: {' '.join(p.cmdline())}"
        for ns in node_namespaces()
        for p in processes_in(ns)
        if "doctor" in " ".join(p.cmdline())
    ]
    assert not left
    assert not [j for j in testbed.squeue_ids()]
