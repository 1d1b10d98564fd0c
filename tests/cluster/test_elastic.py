"""Growing and shrinking a running cluster with member jobs (`raybridge scale`), on the real test bed."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from raybridge.members import RELEASE_WAIT_S
from tests.cluster.bed import PYTHON, TESTBED, all_job_ids, as_user, assert_no_leaks

pytestmark = pytest.mark.cluster

SLOW_TASK = """
import os, socket, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
target = sys.argv[1]
node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == target)
@ray.remote(num_cpus=1, max_retries=3)
def slow(attempts):
    with open(attempts, "a") as f:  # every attempt says where it ran
        print(socket.gethostname(), file=f)
    time.sleep(12)
    return socket.gethostname()
ref = slow.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(sys.argv[2])
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


def start_driver(host, rec, script, *args):
    """A Ray program as the user on one of the cluster's nodes, in the background, once it says "started"."""
    drv = subprocess.Popen(
        as_user(host, *driver_env(rec), PYTHON, "-c", script, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert drv.stdout.readline().strip() == "started"
    return drv


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
        attempts = Path(testbed.shared) / f"attempts-{job}"
        testbed.write(attempts, "")
        drv = start_driver(head, rec, SLOW_TASK, victim["ip"], str(attempts))
        time.sleep(2)  # the task is running on the victim now
        t0 = time.monotonic()
        rm = testbed.raybridge("login", "scale", job, "--remove", "1", "--profile", p)
        took = time.monotonic() - t0
        assert rm.returncode == 0, rm.stderr
        assert f"member job {newest['job_id']}: drained and released {newest['node']}" in rm.stderr, rm.stderr
        out, err = drv.communicate(timeout=120)
        assert drv.returncode == 0, err[-3000:]
        (where,) = re.findall(r"finished on (\S+)", out)
        assert where != newest["node"]
        # A drain, not a kill after the release bound: the first attempt ran on the released node, the
        # retry elsewhere; the member's agent got the notice and left on its own, inside the bound, and
        # its job ended COMPLETED (a job scancelled after the bound ends CANCELLED).
        assert attempts.read_text().split() == [newest["node"], where]
        assert took < RELEASE_WAIT_S, took
        (member_log,) = (testbed.shared_dir / "logs").glob(f"*-{newest['job_id']}.out")
        assert "released: drain notice given to Ray; leaving in" in member_log.read_text()
        testbed.wait_job_gone(newest["job_id"])
        acct = testbed.exec(
            "login", "sacct", "-j", newest["job_id"], "-X", "-n", "-P", "-o", "State", check=True
        )
        assert acct.stdout.split() == ["COMPLETED"], acct.stdout
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
    stopped(testbed, down, job, members)
    assert_no_leaks(job)
    for m in members:
        assert_no_leaks(m)


def stopped(testbed, down, job, members):
    """`raybridge down` succeeded and the job and its member jobs left Slurm's queue."""
    assert down.returncode == 0, down.stderr
    testbed.wait_job_gone(job)
    for m in members:
        testbed.wait_job_gone(m)


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
    stopped(testbed, down, job, members)
    assert_no_leaks(job)


def elastic_example(steps):
    """The example trainer, elastic between 2 and 3 workers, checking for more every 3 s."""
    from tests.cluster.bed import EXAMPLES

    example = str(EXAMPLES / "train_mlp.py")
    flags = ["--every", "20", "--elastic", "2,3", "--resize-check", "3", "--step-sleep", "0.1"]
    return ["python", example, "--steps", str(steps), *flags]


def test_elastic_training_grows_when_a_node_is_added(testbed):
    p = testbed.local_profile
    proc = testbed.start_raybridge(
        "login", "run", "--nodes", "2", "--profile", p, "--", *elastic_example(240)
    )
    job = None
    while job is None:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "no job id"
        if m := re.search(r"submitted job (\d+)", line):
            job = m.group(1)
    run = testbed.shared_dir / "runs" / f"raybridge-{job}"

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
    # It ran with two workers, then with three (the added node's) from a checkpoint. (A later attempt
    # may be smaller again: on the 2-core test bed a loaded node can miss Ray's 3-s health check.)
    attempts: dict[str, dict[str, str]] = {}
    for f in (run / "hosts").iterdir():
        attempt, rank = f.name.split("-")
        attempts.setdefault(attempt, {})[rank] = f.read_text()
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert len(attempts["attempt0"]) == 2, (attempts, resumed)
    grown = [a for a, workers in attempts.items() if len(workers) == 3]
    assert grown, (attempts, resumed)
    # Every worker, the added node's too, writes into the cluster's run.
    assert len(set(attempts[grown[0]].values())) == 3, (attempts, resumed)
    assert not list(run.parent.glob("*member*"))
    testbed.wait_job_gone(job)
    testbed.wait_job_gone(member)
    assert_no_leaks(job)
    assert_no_leaks(member)


DEMAND = """
import os, socket, sys, time, ray
ray.init()
count, flag = int(sys.argv[1]), sys.argv[2]
@ray.remote(num_cpus=2)
def work(flag):  # busy until the test says so
    deadline = time.time() + 300
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.2)
    return socket.gethostname()
print("started", flush=True)
print("hosts", " ".join(sorted(ray.get([work.remote(flag) for _ in range(count)]))), flush=True)
"""


def autoscaled(testbed, job):
    """The autoscaler's member jobs: (all records, the ones Slurm still has queued or running)."""
    rows = [m for m in status(testbed, job)["members"] if m["autoscaled"]]
    return rows, [m for m in rows if m["slurm_state"] in ("PENDING", "RUNNING", "CONFIGURING")]


def test_autoscaler_adds_member_jobs_for_demand_within_the_limits_and_releases_them(testbed):
    p = testbed.local_profile
    # Bad values: one line each, nothing submitted.
    before = testbed.squeue_ids()
    for bad in (
        ["--max-nodes", "0"],
        ["--min-nodes", "2"],
        ["--nodes", "2", "--max-nodes", "1"],
        ["--max-nodes", "3", "--min-nodes", "4"],
        ["--max-nodes", "3", "--idle-timeout", "1;reboot"],
    ):
        b = testbed.raybridge("login", "up", *bad, "--profile", p)
        assert b.returncode != 0 and len(b.stderr.strip().splitlines()) == 1, (bad, b.stderr)
        assert "Traceback" not in b.stderr
    assert testbed.squeue_ids() == before
    args = [
        "--nodes",
        "1",
        "--min-nodes",
        "1",
        "--max-nodes",
        "3",
        "--idle-timeout",
        "20",
        "--join-timeout",
        "30",
    ]
    r = testbed.raybridge("login", "up", *args, "--profile", p)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    blocker = None
    seen: set[str] = set()
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "autoscale  1 to 3 nodes" in r.stdout + r.stderr
        # Another user's job holds two of the three free nodes: one added node can start, one waits.
        blocker = testbed.exec(
            "login",
            "sbatch",
            "--parsable",
            "-N",
            "2",
            "--exclusive",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 600",
            check=True,
        ).stdout.strip()
        rec = testbed.cluster_json(job) | {"token_path": str(testbed.job_dir(job) / "token")}
        head = rec["head"]["hostname"]
        # Five 2-CPU tasks on 2-CPU nodes want five nodes; at most three may be (the head + two).
        flag = Path(testbed.shared) / f"demand-done-{job}"
        drv = start_driver(head, rec, DEMAND, "5", str(flag))

        def one_did_not_join():
            rows, active = autoscaled(testbed, job)
            seen.update(m["job_id"] for m in rows)
            assert len(active) <= 2, active
            return events(testbed, job, "not_joined")

        (nope, *_) = wait_for("a member that did not join in time", one_did_not_join, timeout=150)
        assert "did not join within 30s: Slurm PENDING" in nope["detail"], nope
        assert events(testbed, job, "autoscale_submitted")
        testbed.exec("login", "scancel", blocker, check=True)

        def grown():
            rows, active = autoscaled(testbed, job)
            seen.update(m["job_id"] for m in rows)
            assert len(active) <= 2, active
            return status(testbed, job)["alive_nodes"] == 3

        wait_for("the third node", grown, timeout=120)
        # Two tasks still wait, but the cluster is at its maximum: nothing more is submitted.
        for _ in range(10):
            grown()  # (asserts the bound)
            time.sleep(1)
        assert len(autoscaled(testbed, job)[1]) == 2
        flag.write_text("")
        out, err = drv.communicate(timeout=300)
        assert drv.returncode == 0, err[-3000:]
        (hosts,) = re.findall(r"hosts (.*)", out)
        assert len(set(hosts.split())) == 3, hosts  # the head and two added nodes did the work

        def released():
            rows, active = autoscaled(testbed, job)
            seen.update(m["job_id"] for m in rows)
            s = status(testbed, job)
            return not active and s["alive_nodes"] == 1 and s

        s = wait_for("the idle nodes released", released, timeout=120)
        assert len(events(testbed, job, "autoscale_released")) >= 2
        assert not any(e["event"] == "node_dead" for e in s["events"]), s["events"]
        assert all(n["alive"] or n["left"] for n in s["nodes"])
        text = testbed.raybridge("login", "status", job, "--profile", p).stdout
        assert "autoscaled): Slurm" in text and "autoscale_released" in text, text
        assert "autoscale  1 to 3 nodes, idle nodes released after 20s" in text, text
    finally:
        if blocker:
            testbed.exec("login", "scancel", blocker)
        down = testbed.raybridge("login", "down", job, "--profile", p)
    stopped(testbed, down, job, seen)
    for m in seen:
        assert_no_leaks(m)
    assert_no_leaks(job)
    # From Slurm's accounting rather than our once-a-second samples: every job after the cluster's but
    # the blocker is a member the autoscaler submitted, each one recorded, and their allocations never
    # overlapped beyond the limit (two besides the cluster's own node).
    members = [str(j) for j in all_job_ids(testbed) if j > int(job) and str(j) != blocker]
    assert seen <= set(members) and len(members) >= 3, (seen, members)
    submitted = [e for e in s["events"] if e["event"] == "autoscale_submitted"]  # (status, before down)
    assert len(submitted) == len(members), (submitted, members)
    assert most_at_once(testbed, members) <= 2
    # Released by a drain, not killed: Ray's autoscaler drains an idle node itself before it asks for
    # its release, and each member that ran then left on its own (COMPLETED, where a job scancelled
    # after the release bound ends CANCELLED), saying so in its log.
    ran = [row for row in accounting(testbed, members) if row[1] not in ("Unknown", "None", "")]
    assert len(ran) >= 2, ran
    for job_id, _, _, state in ran:
        assert state == "COMPLETED", (job_id, state)
        (log,) = (testbed.shared_dir / "logs").glob(f"*-{job_id}.out")
        assert "released: this node has already left Ray (drained by Ray's autoscaler" in log.read_text(), (
            job_id
        )


def accounting(testbed, jobs: list[str]) -> list[tuple[str, str, str, str]]:
    """(job id, Start, End, State) of each job, from sacct."""
    out = testbed.admin(
        "login", "sacct", "-j", ",".join(jobs), "-X", "-n", "-P", "-o", "JobIDRaw,Start,End,State", check=True
    ).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]


def most_at_once(testbed, jobs: list[str]) -> int:
    """The most of these jobs that held an allocation at the same time, by sacct's Start and End."""
    edges = []
    for _, start, end, _ in accounting(testbed, jobs):
        if start in ("Unknown", "None", "") or end in ("Unknown", "None", ""):
            continue  # never started (cancelled while pending)
        edges += [(start, 1), (end, -1)]
    peak = now = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same second
        now += step
        peak = max(peak, now)
    return peak


def test_elastic_training_gets_its_workers_from_the_autoscaler(testbed):
    """Ray Train's elastic ScalingConfig(num_workers=(2, 3)) asks Ray's autoscaler for three workers'
    resources; on a one-node allocation the autoscaler adds two member jobs and training runs on three."""
    r = testbed.raybridge(
        "login", "run", "--nodes", "1", "--max-nodes", "3", "--idle-timeout", "20",
        "--profile", testbed.local_profile, "--", *elastic_example(120), timeout=400,
    )  # fmt: skip
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(re.findall(r"RESULT: (\{.*\})", r.stdout)[-1])
    assert result["final_step"] == 120
    run = testbed.shared_dir / "runs" / f"raybridge-{job}"
    ranks = {f.name for f in (run / "hosts").iterdir()}
    assert any(r.endswith("-rank2") for r in ranks), ranks  # three workers (at once, or after a resize)
    added = [m for m in status(testbed, job)["members"] if m["autoscaled"]]
    assert len(added) == 2, added
    testbed.wait_job_gone(job)
    for m in added:
        testbed.wait_job_gone(m["job_id"])
        assert_no_leaks(m["job_id"])
    assert_no_leaks(job)


def test_a_head_crash_keeps_the_autoscaled_members(testbed, crashed_nodes):
    """Two autoscaled member nodes run when the head's node crashes: the new head's autoscaler takes
    them over (they rejoin it) instead of releasing them as nodes that never joined."""
    p = testbed.local_profile
    args = ["--nodes", "2", "--max-nodes", "4", "--idle-timeout", "120", "--join-timeout", "30"]
    r = testbed.raybridge("login", "up", *args, "--profile", p)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        rec = testbed.cluster_json(job) | {"token_path": str(testbed.job_dir(job) / "token")}
        head = rec["head"]["hostname"]
        batch = testbed.exec("login", "squeue", "-h", "-j", job, "-o", "%B", check=True).stdout.strip()
        assert head != batch  # the head runs on the second node: its crash leaves the allocation
        # Four 2-CPU tasks want four nodes: the autoscaler adds two member jobs. The driver runs on the
        # head's node and dies with it.
        flag = Path(testbed.shared) / f"head-crash-demand-{job}"
        drv = start_driver(head, rec, DEMAND, "4", str(flag))
        grown = wait_for("4 alive nodes", lambda: (s := status(testbed, job))["alive_nodes"] == 4 and s, 150)
        members = {m["job_id"]: m["node"] for m in grown["members"] if m["autoscaled"]}
        assert len(members) == 2, grown["members"]
        # Crash only once the members are older than --join-timeout: the new head's first look at them
        # (not rejoined yet) is then exactly the moment a provider that forgot them would release them.
        newest = max(m["submitted_at"] for m in grown["members"] if m["autoscaled"])
        time.sleep(max(0.0, newest + 35 - time.time()))
        crashed_nodes.append(head)
        subprocess.run([TESTBED, "crash", head], check=True, capture_output=True)
        drv.kill()
        drv.communicate()

        def recovered():
            # Ready with three nodes, and the members' own records rewritten for the new head (a node is
            # alive in the GCS a moment before its agent records that it rejoined).
            s = status(testbed, job)
            gens = {n["hostname"]: n.get("generation") for n in s["nodes"] if n["alive"]}
            rejoined = all(gens.get(node) == 1 for node in members.values())
            return s["ray_state"] == "ready" and s["alive_nodes"] == 3 and rejoined and s

        s = wait_for("the new head with both members", recovered, 120)
        info = testbed.cluster_json(job)
        assert info["generation"] == 1 and info["head"]["hostname"] != head
        # The same two member jobs, still running, their nodes rejoined to the new head; none released.
        now = {m["job_id"]: m for m in s["members"] if m["autoscaled"]}
        assert set(now) == set(members) and all(m["slurm_state"] == "RUNNING" for m in now.values()), now
        rejoined = {n["hostname"]: n for n in s["nodes"] if n["alive"]}
        assert set(members.values()) <= set(rejoined), rejoined
        assert all(rejoined[node]["generation"] == 1 for node in members.values()), rejoined
        # Past the point where a new head that did not know them would release them as never joined
        # (--join-timeout 30 from its start), yet before they are idle for --idle-timeout.
        time.sleep(max(0.0, info["ready_at"] + 35 - time.time()))
        s = status(testbed, job)
        names = [e["event"] for e in s["events"]]
        assert "not_joined" not in names and "autoscale_released" not in names, s["events"]
        assert s["alive_nodes"] == 3
    finally:
        down = testbed.raybridge("login", "down", job, "--profile", p)
    assert down.returncode == 0, down.stderr
    testbed.wait_job_gone(job)
    assert_no_leaks(job)
