"""Fault-tolerant training on the real test bed: node loss, spares, time-limit signal + requeue,
scancel, and corrupt checkpoints. Each test asserts exact step counts."""

import json
import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.bed import REPO, assert_no_leaks

pytestmark = pytest.mark.cluster
EXAMPLE = str(REPO / "examples" / "train_mlp.py")
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
    return Path(testbed.shared) / "raybridge" / "runs" / f"{name}-{job}"


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


def test_raylet_killed_on_a_worker_node_training_completes(testbed):
    proc, job = start_training(testbed, nodes=3)
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    victim = sorted(h for h in hosts(run, 0) if h != "n1")[0]
    assert kill_in_node(victim, job, ("raylet",)) == ["raylet"]
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == STEPS
    assert result["restores"] >= 1
    assert 0 < result["redone_steps"] <= EVERY  # at most one checkpoint interval redone
    assert_no_leaks(job)


def test_spare_node_takes_over_from_a_dead_node(testbed):
    proc, job = start_training(testbed, nodes=2, extra=("--spare-nodes", "1"))
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    before = hosts(run, 0)
    assert len(before) == 2
    victim = sorted(h for h in before if h != "n1")[0]
    # The whole node goes: its raybridge agent (no self-healing), raylet and training worker.
    assert "raylet" in kill_in_node(victim, job)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == STEPS and result["restores"] >= 1
    after = hosts(run, result["restores"])
    assert victim not in after and len(after) == 2  # the spare replaced the dead node
    status = testbed.cluster_json(job)
    assert any(not n["alive"] and n["hostname"] == victim for n in status["nodes"])  # recorded as failed


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
    profile.write_text(Path(testbed.local_profile).read_text() + f"  RAYBRIDGE_RUN_NAME: {name}\n")
    proc, _ = start_training(testbed, nodes=2, profile=str(profile), steps=3 * EVERY, sleep=0)
    rc, result, out, err = finish(proc)
    assert rc == 0 and result["final_step"] == 3 * EVERY, out[-2000:] + err[-2000:]
    run = Path(testbed.shared) / "raybridge" / "runs" / name
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
