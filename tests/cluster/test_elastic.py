"""Growing and shrinking a running cluster with member jobs (`raybridge scale`), on the real test bed."""

import json
import re
import subprocess
import time

import pytest

from tests.cluster.bed import PYTHON, TESTBED, assert_no_leaks

pytestmark = pytest.mark.cluster

SLOW_TASK = """
import os, socket, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
target = sys.argv[1]
node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == target)
@ray.remote(num_cpus=1, max_retries=3)
def slow():
    time.sleep(12)
    return socket.gethostname()
ref = slow.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote()
print("started", flush=True)
print("finished on", ray.get(ref), flush=True)
"""

LABELLED = """
import socket, ray
ray.init()
@ray.remote(num_cpus=1, label_selector={"raybridge.io/partition": "shared"})
def where():
    return socket.gethostname()
print("labelled task on", ray.get(where.remote()), flush=True)
"""


def status(testbed, job):
    r = testbed.raybridge("login", "status", job, "--json", "--profile", testbed.local_profile)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(what, check, timeout=120):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(1)
    return got


def driver_env(rec):
    return [
        "env",
        f"RAY_ADDRESS={rec['address']}",
        "RAY_AUTH_MODE=token",
        f"RAY_AUTH_TOKEN_PATH={rec['token_path']}",
    ]


def test_scale_add_remove_labels_and_down(testbed):
    p = testbed.local_profile
    r = testbed.raybridge("login", "up", "--nodes", "2", "--profile", p)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    members = []
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        # Bad values: one line, nothing submitted.
        before = testbed.squeue_ids()
        for bad in (["--add", "1", "--partition", "a b;rm -rf /"], ["--add", "0"], ["--remove", "1"], []):
            b = testbed.raybridge("login", "scale", job, *bad, "--profile", p)
            assert b.returncode != 0 and len(b.stderr.strip().splitlines()) == 1, (bad, b.stderr)
            assert "Traceback" not in b.stderr
        assert testbed.squeue_ids() == before
        # Grow by two nodes.
        a = testbed.raybridge("login", "scale", job, "--add", "2", "--profile", p)
        assert a.returncode == 0, a.stderr
        members = re.search(r"submitted member job\(s\) ([\d, ]+);", a.stderr).group(1).split(", ")
        assert len(members) == 2
        rec = wait_for("4 alive nodes", lambda: (s := status(testbed, job))["alive_nodes"] == 4 and s)
        assert {m["job_id"] for m in rec["members"]} == set(members)
        assert all(m["slurm_state"] == "RUNNING" and m["node"] for m in rec["members"])
        text = testbed.raybridge("login", "status", job, "--profile", p).stdout
        assert all(re.search(rf"member job {m} \(debug\): Slurm RUNNING, n\d", text) for m in members), text
        # A task on the newest member node, then that node is released: the task runs elsewhere.
        newest = max(rec["members"], key=lambda m: m["submitted_at"])
        victim = next(n for n in rec["nodes"] if n["hostname"] == newest["node"])
        head = testbed.cluster_json(job)["head"]["hostname"]
        drv = subprocess.Popen(
            [TESTBED, "exec", head, "--", *driver_env(rec), PYTHON, "-c", SLOW_TASK, victim["ip"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert drv.stdout.readline().strip() == "started"
        time.sleep(2)  # the task is running on the victim now
        rm = testbed.raybridge("login", "scale", job, "--remove", "1", "--profile", p)
        assert rm.returncode == 0, rm.stderr
        assert f"member job {newest['job_id']}: drained and released {newest['node']}" in rm.stderr, rm.stderr
        out, err = drv.communicate(timeout=120)
        assert drv.returncode == 0, err[-3000:]
        (where,) = re.findall(r"finished on (\S+)", out)
        assert where != newest["node"]
        assert newest["job_id"] not in testbed.squeue_ids()
        idle = testbed.exec(
            "login", "sinfo", "-h", "-N", "-p", "debug", "-n", newest["node"], "-o", "%t", check=True
        )
        assert idle.stdout.strip() == "idle"
        wait_for("3 alive nodes", lambda: status(testbed, job)["alive_nodes"] == 3)
        # Another worker group: the shared partition, with its label; a task that selects it runs there.
        g = testbed.raybridge("login", "scale", job, "--add", "1", "--partition", "shared", "--profile", p)
        assert g.returncode == 0, g.stderr
        shared_job = re.search(r"submitted member job\(s\) (\d+);", g.stderr).group(1)
        members.append(shared_job)
        rec = wait_for("4 alive nodes again", lambda: (s := status(testbed, job))["alive_nodes"] == 4 and s)
        shared = next(m for m in rec["members"] if m["job_id"] == shared_job)
        assert shared["partition"] == "shared" and "raybridge.io/partition=shared" in shared["labels"]
        lab = testbed.exec(head, *driver_env(rec), PYTHON, "-c", LABELLED, timeout=120)
        assert f"labelled task on {shared['node']}" in lab.stdout, lab.stdout + lab.stderr[-2000:]
    finally:
        down = testbed.raybridge("login", "down", job, "--profile", p)
    assert down.returncode == 0, down.stderr
    testbed.wait_job_gone(job)
    for m in members:
        testbed.wait_job_gone(m)
    assert_no_leaks(job)
    for m in members:
        assert_no_leaks(m)


def events(testbed, job, name):
    return [e for e in status(testbed, job)["events"] if e["event"] == name]


def test_replace_lost_brings_the_cluster_back_to_size_once(testbed, crashed_nodes):
    p = testbed.local_profile
    r = testbed.raybridge("login", "up", "--nodes", "3", "--replace-lost", "1", "--profile", p)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    members = []
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        info = testbed.cluster_json(job)
        batch = testbed.exec("login", "squeue", "-h", "-j", job, "-o", "%B", check=True).stdout.strip()
        victim = next(
            n["hostname"] for n in info["nodes"] if n["hostname"] not in (batch, info["head"]["hostname"])
        )
        crashed_nodes.append(victim)
        subprocess.run([TESTBED, "crash", victim], check=True, capture_output=True)
        (sub,) = wait_for("a replacement", lambda: events(testbed, job, "replacement_submitted"))
        assert sub["node"] == victim
        rec = wait_for("3 alive nodes again", lambda: (s := status(testbed, job))["alive_nodes"] == 3 and s)
        (member,) = rec["members"]
        members.append(member["job_id"])
        assert member["slurm_state"] == "RUNNING" and member["node"] not in (victim, batch)
        # A second loss is beyond the bound: reported, not replaced.
        crashed_nodes.append(member["node"])
        subprocess.run([TESTBED, "crash", member["node"]], check=True, capture_output=True)
        (nope,) = wait_for("the refusal", lambda: events(testbed, job, "not_replaced"))
        assert nope["node"] == member["node"] and "--replace-lost 1" in nope["detail"]
        time.sleep(3)
        rec = status(testbed, job)
        assert len(rec["members"]) == 1 and rec["alive_nodes"] == 2
        text = testbed.raybridge("login", "status", job, "--profile", p).stdout
        assert "not_replaced" in text and "replacement_submitted" in text, text
    finally:
        down = testbed.raybridge("login", "down", job, "--profile", p)
    assert down.returncode == 0, down.stderr
    testbed.wait_job_gone(job)
    for m in members:
        testbed.wait_job_gone(m)
    assert_no_leaks(job)


def test_elastic_training_grows_when_a_node_is_added(testbed):
    from pathlib import Path

    from tests.cluster.bed import REPO

    example = str(REPO / "examples" / "train_mlp.py")
    p = testbed.local_profile
    args = [
        "--steps",
        "240",
        "--every",
        "20",
        "--elastic",
        "2,3",
        "--resize-check",
        "3",
        "--step-sleep",
        "0.1",
    ]
    proc = testbed.start_raybridge(
        "login", "run", "--nodes", "2", "--profile", p, "--", "python", example, *args
    )
    job = None
    while job is None:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "no job id"
        if m := re.search(r"submitted job (\d+)", line):
            job = m.group(1)
    run = Path(testbed.shared) / "raybridge" / "runs" / f"raybridge-{job}"

    def progressed():
        try:
            return json.loads((run / "progress.json").read_text())["high_water"] >= 30
        except (OSError, ValueError):
            return False

    wait_for("training to get going", progressed, timeout=180)
    a = testbed.raybridge("login", "scale", job, "--add", "1", "--profile", p)
    assert a.returncode == 0, a.stderr
    member = re.search(r"submitted member job\(s\) (\d+);", a.stderr).group(1)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    result = json.loads(re.findall(r"RESULT: (\{.*\})", out)[-1])
    assert result["final_step"] == 240
    # It ran with two workers, then with three (the added node's) from a checkpoint.
    ranks = {f.name for f in (run / "hosts").iterdir()}
    assert any(r.endswith("-rank1") for r in ranks) and any(r.endswith("-rank2") for r in ranks), ranks
    hosts3 = {(run / "hosts" / r).read_text() for r in ranks if r.startswith(f"attempt{result['restores']}-")}
    assert len(hosts3) == 3, hosts3  # every worker, the added node's too, writes into the cluster's run
    assert not list(run.parent.glob("*member*"))
    testbed.wait_job_gone(job)
    testbed.wait_job_gone(member)
    assert_no_leaks(job)
    assert_no_leaks(member)
