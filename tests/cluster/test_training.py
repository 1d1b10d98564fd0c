"""Fault-tolerant training on the real test bed: node loss, spares, time-limit signal + requeue,
scancel, and corrupt checkpoints. Each test asserts exact step counts."""

import contextlib
import json
import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.bed import EXAMPLES, TESTBED, assert_no_leaks

pytestmark = pytest.mark.cluster
EXAMPLE = str(EXAMPLES / "train_mlp.py")
STEPS, EVERY = 200, 40


def start_training(testbed, *args, nodes=2, extra=(), profile=None, steps=STEPS, sleep=0.06):
    p = testbed.start_raybridge(
        "login",
        "run",
        "--nodes",
        str(nodes),
        "--profile",
        profile or testbed.local_profile,
        *extra,
        "--",
        "python",
        EXAMPLE,
        "--steps",
        str(steps),
        "--every",
        str(EVERY),
        "--workers",
        "2",
        "--step-sleep",
        str(sleep),
        *args,
    )
    job = None
    deadline = time.monotonic() + 120
    while job is None:
        line = p.stderr.readline()
        m = re.search(r"submitted job (\d+)", line)
        if m:
            job = m.group(1)
        assert time.monotonic() < deadline and (line or p.poll() is None), "no job id"
    return p, job


def run_dir(testbed, job, name="raybridge"):
    return testbed.shared_dir / "runs" / f"{name}-{job}"


def wait_progress(testbed, run: Path, at_least: int, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        try:
            step = json.loads((run / "progress.json").read_text())["high_water"]
            if step >= at_least:
                return step
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.1)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    m = re.findall(r"RESULT: (\{.*\})", out)
    return proc.returncode, (json.loads(m[-1]) if m else None), out, err


def hosts(run: Path, attempt: int) -> set[str]:
    return {p.read_text() for p in (run / "hosts").glob(f"attempt{attempt}-rank*")}


def kill_in_node(node: str, job: str, names: tuple[str, ...] | None = None) -> list[str]:
    """SIGKILL this job's processes in one node's namespace (all of them, or those with the given names)."""
    pids = subprocess.run(
        ["ip", "netns", "pids", f"rbtb-{node}"], capture_output=True, text=True
    ).stdout.split()
    killed = []
    for pid in pids:
        try:
            p = psutil.Process(int(pid))
            mine = p.environ().get("SLURM_JOB_ID") == job or p.environ().get("RAYBRIDGE_JOB_ID") == job
            if mine and (names is None or p.name() in names):
                p.kill()
                killed.append(p.name())
        except psutil.Error:
            continue
    return killed


def head_host(testbed, job) -> str:
    return testbed.cluster_json(job)["head"]["hostname"]


def job_hosts(testbed, job) -> list[str]:
    """The job's nodes in Slurm's order: the first one runs the batch script."""
    nodelist = testbed.exec("login", "squeue", "-h", "-j", job, "-o", "%N", check=True).stdout.strip()
    return testbed.exec("login", "scontrol", "show", "hostnames", nodelist, check=True).stdout.split()


def crash(node: str, job: str) -> list[str]:
    """What a node crash is (scripts/testbed crash): the node's slurmd and every process on it die
    with SIGKILL at once, and Slurm marks the node down. Returns the names of the job's processes
    that were running there (for the test to check it hit something)."""
    names = [p.name() for p in job_procs_in(node, job)]
    subprocess.run([TESTBED, "crash", node], check=True, capture_output=True)
    return names


def job_procs_in(node: str, job: str) -> list[psutil.Process]:
    out = []
    pids = subprocess.run(["ip", "netns", "pids", f"rbtb-{node}"], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(int(pid))
            if p.environ().get("SLURM_JOB_ID") == job or p.environ().get("RAYBRIDGE_JOB_ID") == job:
                out.append(p)
    return out


def test_raylet_killed_on_a_worker_node_training_completes(testbed):
    # Three workers on three nodes: the node that is neither the batch host (n1) nor the head has one.
    proc, job = start_training(testbed, "--workers", "3", nodes=3)
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    batch, *others = job_hosts(testbed, job)
    victim = (set(others) - {head_host(testbed, job)}).pop()
    assert victim in hosts(run, 0)
    assert kill_in_node(victim, job, ("raylet",)) == ["raylet"]
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == STEPS
    assert result["restores"] >= 1
    assert 0 < result["redone_steps"] <= EVERY  # at most one checkpoint interval redone
    assert_no_leaks(job)


def wait_warm(job: str, nodes: list[str], proc, timeout=60) -> None:
    """Until every node has an idle Ray worker process of this job (agent/warm.py)."""
    deadline = time.monotonic() + timeout
    while True:
        idle = {n for n in nodes for p in job_procs_in(n, job) if title(p).startswith("ray::IDLE")}
        if idle == set(nodes):
            return
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no warm worker on {sorted(set(nodes) - idle)}"
        time.sleep(0.2)


def title(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error, IndexError):
        return p.cmdline()[0]
    return ""


def test_spare_node_takes_over_from_a_dead_node(testbed):
    # Three training nodes and a spare (the whole bed): at least one training node is neither the batch
    # host nor the head, so the victim is a plain worker whatever the placement.
    steps = 2 * STEPS  # time for every node's warm worker to start before the loss
    proc, job = start_training(testbed, "--workers", "3", nodes=3, extra=("--spare-nodes", "1"), steps=steps)
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    before = hosts(run, 0)
    assert len(before) == 3
    head = testbed.cluster_json(job)["head"]["hostname"]
    victim = sorted(before - {job_hosts(testbed, job)[0], head})[0]
    wait_warm(job, job_hosts(testbed, job), proc)
    # The whole node goes: its raybridge agent (no self-healing), raylet and training worker.
    lost_at = time.time()
    assert "raylet" in kill_in_node(victim, job)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == steps and result["restores"] >= 1
    after = hosts(run, result["restores"])
    assert victim not in after and len(after) == 3  # the spare replaced the dead node
    # Each worker of the new group ran in a process started before the loss: a warm one, the spare's too.
    for f in (run / "procs").glob(f"attempt{result['restores']}-rank*"):
        assert json.loads(f.read_text())["started"] < lost_at, f.name
    status = testbed.cluster_json(job)
    (node,) = [n for n in status["nodes"] if n["hostname"] == victim]
    assert not node["alive"] and node["generation"] == 0  # recorded dead; it never rejoined
    assert status["head"]["hostname"] == head  # a worker's loss: the head stayed
    assert not [e for e in status["events"] if e["event"] == "head_lost"]


def test_time_limit_signal_checkpoints_requeues_and_resumes(testbed):
    proc, job = start_training(testbed, nodes=2, extra=("--requeue", "--signal-before", "60"))
    run = run_dir(testbed, job)
    at = wait_progress(testbed, run, EVERY + 15, proc)
    # What Slurm does --signal seconds before the time limit (or on preemption): USR1 to the batch shell.
    testbed.exec("login", "scancel", "--signal=USR1", "--batch", job, check=True)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert f"requeueing job {job} (restart 1 of 3)" in out
    assert result["final_step"] == STEPS
    assert result["restores"] == 1 and result["redone_steps"] == 0  # saved at the signal: nothing lost
    state = json.loads((run / "progress.json").read_text())
    assert state["high_water"] == STEPS
    starts = sorted(
        int(p.name.split("-")[0].removeprefix("attempt")) for p in (run / "hosts").glob("*-rank0")
    )
    assert starts == [0, 1]
    info = testbed.cluster_json(job)
    assert info["restart_count"] == 1
    # Saved where the signal found the loop (at or after the step it had reached when USR1 was
    # sent), not at the last periodic checkpoint.
    m = re.search(r"resumed from step (\d+) \(0 steps redone\)", out)
    assert m and at <= int(m.group(1)) < STEPS, out[-3000:]


def test_a_time_limit_checkpoint_through_rays_drain(testbed):
    """Slurm's USR1 becomes Ray's drain notice (reason preemption, the time left as its deadline) for every
    node; a training loop that listens only to Ray Train (`ray.train.get_preemption_info()`, no raybridge
    flag) saves at once and returns; the job is requeued and resumes with nothing redone."""
    proc, job = start_training(
        testbed, "--ray-preemption", nodes=2, extra=("--requeue", "--signal-before", "60")
    )
    run = run_dir(testbed, job)
    at = wait_progress(testbed, run, EVERY + 15, proc)
    sent = time.time()
    testbed.exec("login", "scancel", "--signal=USR1", "--batch", job, check=True)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    m = re.search(r"Ray's preemption notice at step (\d+): 2 nodes, deadline in (\d+)s", out)
    assert m, out[-3000:]
    assert int(m.group(1)) >= at and 45 <= int(m.group(2)) <= 60  # USR1 came 60 s before the limit
    notice = [
        e
        for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())
        if e["event"] == "ray_preemption"
    ]
    assert len(notice) == 1 and 0 < notice[0]["t"] - sent < 5, notice  # within seconds of the signal
    assert f"requeueing job {job} (restart 1 of 3)" in out
    assert result["final_step"] == STEPS and result["restores"] == 1 and result["redone_steps"] == 0, result
    drained = [e for e in testbed.cluster_json(job)["events"] if e["event"] == "drained"]
    assert drained and drained[0]["detail"].startswith("2 of 2 nodes, deadline in"), drained
    m = re.search(r"resumed from step (\d+) \(0 steps redone\)", out)
    assert m and int(m.group(1)) >= at, out[-3000:]
    # Ray ends a drained node's raylet once idle: the agent leaves it so (a new one would only delay the end).
    assert "the raylet on this node died" not in out, out[-3000:]


def test_scancel_mid_training_tears_down_and_keeps_the_last_checkpoint(testbed):
    from raybridge import train as rbt

    proc, job = start_training(testbed, nodes=2)
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 10, proc)
    testbed.exec("login", "scancel", job, check=True)
    finish(proc, timeout=120)
    testbed.wait_job_gone(job)
    assert_no_leaks(job, timeout=30)
    complete = [p for p in rbt.checkpoints_newest_first(run) if rbt.is_complete(p)]
    assert complete, "the last checkpoint must survive scancel"
    assert rbt.read_checkpoint_dir(complete[0])["step"] >= EVERY


def test_resume_skips_a_corrupt_newest_checkpoint(testbed):
    from raybridge import train as rbt

    name = f"corrupt-{int(time.time())}"
    profile = Path(testbed.shared) / f"{name}.yaml"
    testbed.write(profile, Path(testbed.local_profile).read_text() + f"  RAYBRIDGE_RUN_NAME: {name}\n")
    proc, _ = start_training(testbed, nodes=2, profile=str(profile), steps=3 * EVERY, sleep=0)
    rc, result, out, err = finish(proc)
    assert rc == 0 and result["final_step"] == 3 * EVERY, out[-2000:] + err[-2000:]
    run = testbed.shared_dir / "runs" / name
    # Three checkpoints (steps 40, 80, 120): resuming from the middle one tells "skip the corrupt
    # newest" apart from "take the oldest" or "take any complete one".
    steps = [rbt.read_checkpoint_dir(c)["step"] for c in rbt.checkpoints_newest_first(run)]
    assert steps == [3 * EVERY, 2 * EVERY, EVERY], steps
    newest = rbt.checkpoints_newest_first(run)[0]
    with open(newest / rbt.STATE, "r+b") as f:  # a crash mid-write left it torn
        f.truncate(100)
    proc, _ = start_training(testbed, nodes=2, profile=str(profile), steps=4 * EVERY, sleep=0)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-2000:] + err[-2000:]
    assert result["final_step"] == 4 * EVERY
    assert result["restores"] == 1
    starts = json.loads((run / "progress.json").read_text())
    assert starts["high_water"] == 4 * EVERY
    assert f"resumed from step {2 * EVERY} " in out


def test_head_node_crash_a_new_head_takes_over_and_training_finishes(testbed, crashed_nodes):
    """The head runs on the second node; its crash leaves the batch host, which goes on: the other
    agents choose a new head, the driver starts again and resumes from the newest checkpoint."""
    proc, job = start_training(testbed, nodes=3)
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    head = head_host(testbed, job)
    batch = job_hosts(testbed, job)[0]
    assert head != batch
    crashed_nodes.append(head)
    crashed_at = time.time()
    assert crash(head, job)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == STEPS
    assert result["restores"] >= 1 and 0 <= result["redone_steps"] <= EVERY
    assert re.search(r"the driver runs again on the new head n\d \(1 of 3\)", out)
    info = testbed.cluster_json(job)
    assert info["generation"] == 1 and info["head"]["hostname"] not in (head, batch)
    # The standby on the next node in line ran it: its imports done before the loss, no new srun step.
    new_head = info["head"]["hostname"]
    log = (testbed.shared_dir / "logs" / f"raybridge-{job}.out").read_text()  # with raybridge's own lines
    standby = rf"standing by on {new_head} to run the command if the head is lost; imported early: .*torch"
    assert re.search(standby, log), log[-3000:]
    assert re.search(rf"nodes alive on head {new_head} \(the standby takes over\)", log), log[-3000:]
    events = [(e["event"], e["node"]) for e in info["events"]]
    assert ("head_lost", head) in events and ("head_replaced", info["head"]["hostname"]) in events
    lost = next(e for e in info["events"] if e["event"] == "head_lost")
    assert lost["at"] >= crashed_at
    assert_no_leaks(job)


def test_worker_node_crash_is_survived(testbed, crashed_nodes):
    # Three workers on four nodes: two nodes are neither the batch host nor the head, and at least
    # one of them has a worker; the three that stay can hold the three workers again.
    proc, job = start_training(testbed, "--workers", "3", nodes=3, extra=("--spare-nodes", "1"))
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    batch, *others = job_hosts(testbed, job)
    victim = sorted((set(others) - {head_host(testbed, job)}) & hosts(run, 0))[0]
    crashed_nodes.append(victim)
    assert "raylet" in crash(victim, job)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == STEPS and result["restores"] >= 1
    assert 0 <= result["redone_steps"] <= EVERY
    assert testbed.cluster_json(job)["generation"] == 0  # the head stayed
    assert_no_leaks(job)
    # The job's timeline has every phase in order, the node's death and the restore after it.
    st = testbed.raybridge("login", "status", job, "--json", "--profile", testbed.local_profile)
    tl = json.loads(st.stdout)["timeline"]
    at = {}
    for e in tl:
        at.setdefault((e["event"], e["node"] if e["event"] in ("node_dead", "node_joined") else ""), e["at"])
    joined = [t for (ev, _), t in at.items() if ev == "node_joined"]
    assert len(joined) == 4, tl
    order = [at[("queued", "")], at[("started", "")], at[("head_up", "")], max(joined), at[("all_alive", "")]]
    order += [at[("driver_started", "")], at[("node_dead", victim)], at[("restored", "")]]
    order += [at[("driver_ended", "")], at[("stopped", "")]]
    assert order == sorted(order), tl
    text = testbed.raybridge("login", "status", job, "--timeline", "--profile", testbed.local_profile).stdout
    assert re.search(rf"node_dead +{victim} ", text) and "restored" in text, text


def test_batch_host_crash_with_requeue_resumes_in_the_next_start(testbed, crashed_nodes):
    """The batch host carries the batch script: its crash ends this start of the job. Slurm requeues
    it (--requeue); `raybridge run` lets it start at once and follows it to the end."""
    proc, job = start_training(testbed, nodes=2, extra=("--requeue",))
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    batch = job_hosts(testbed, job)[0]
    crashed_nodes.append(batch)
    assert crash(batch, job)
    rc, result, out, err = finish(proc, timeout=400)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert result["final_step"] == STEPS
    assert result["restores"] >= 1 and 0 <= result["redone_steps"] <= EVERY
    assert re.search(
        rf"job {job} was requeued and held (until \S+ )?for Slurm's credential expiry; starting it now", err
    )
    assert testbed.cluster_json(job)["restart_count"] == 1
    assert_no_leaks(job)
    st = testbed.raybridge("login", "status", job, "--json", "--profile", testbed.local_profile)
    events = [e["event"] for e in json.loads(st.stdout)["timeline"]]
    # The first start, the requeue, the second start and the restore in it, in that order.
    assert events.index("started") < events.index("requeued") < events.index("restored"), events


def test_batch_host_crash_without_requeue_says_how_to_continue_and_resume_finishes(testbed, crashed_nodes):
    profile = testbed.local_profile  # no `requeue: true`: the job is submitted with --no-requeue
    proc, job = start_training(testbed, nodes=2, profile=profile)
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    batch = job_hosts(testbed, job)[0]
    crashed_nodes.append(batch)
    assert crash(batch, job)
    rc, result, out, err = finish(proc, timeout=200)
    assert rc != 0 and result is None
    line = next(x for x in err.splitlines() if "continue it with" in x)
    m = re.search(rf"training run (raybridge-{job}): its newest complete checkpoint is at step (\d+); ", line)
    assert m, line
    step = int(m.group(2))
    assert step >= EVERY and step % EVERY == 0
    assert (
        f"raybridge run --resume raybridge-{job} --nodes 2 --profile {testbed.local_profile} -- python"
        in line
    )
    testbed.wait_job_gone(job)
    assert_no_leaks(job)
    subprocess.run([TESTBED, "revive", batch], check=True, capture_output=True)
    crashed_nodes.clear()
    again, job2 = start_training(
        testbed, nodes=2, profile=str(profile), extra=("--resume", f"raybridge-{job}")
    )
    rc, result, out, err = finish(again)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == STEPS and result["run"] == f"raybridge-{job}"
    assert f"resumed from step {step} " in out
    assert_no_leaks(job2)
