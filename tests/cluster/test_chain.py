"""`raybridge run --chain K` on the real test bed: a training longer than one allocation continues in the
next one, queued behind it, where requeue is disabled; the chain ends where the training does."""

import json
import re
import time

import pytest

from tests.cluster.bed import all_job_ids, assert_no_leaks
from tests.cluster.test_training import finish, run_dir, start_training, wait_progress

pytestmark = pytest.mark.cluster
STEPS = 300


def wait_file(path, timeout=60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)
    return path.read_text().strip()


def sacct_states(testbed, jobs: list[str]) -> dict[str, str]:
    out = testbed.admin("login", "sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State", "-j", ",".join(jobs))
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def test_a_chained_training_ends_with_the_exact_step_count_across_three_allocations(testbed):
    before = set(all_job_ids(testbed))
    extra = ("--chain", "3", "--signal-before", "30", "--no-requeue", "--time", "10")
    proc, first = start_training(testbed, nodes=2, steps=STEPS, extra=extra)
    run = run_dir(testbed, first)  # one run name for the whole chain: the first job's
    jobs = [first]
    for at_least in (60, 160):
        wait_progress(testbed, run, at_least, proc)
        # The next allocation was queued when this one started, behind it (afterany).
        nxt = wait_file(testbed.job_dir(jobs[-1]) / "chain-next")
        pending = testbed.admin("login", "squeue", "-h", "-j", nxt, "-o", "%T %E", check=True).stdout
        assert pending.split()[0] == "PENDING" and f"afterany:{jobs[-1]}" in pending, pending
        # What Slurm sends --signal-before the time limit: the training checkpoints, the job ends.
        testbed.exec("login", "scancel", "--signal=USR1", "--batch", jobs[-1], check=True)
        jobs.append(nxt)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert result["final_step"] == STEPS and result["restores"] == 2, result
    assert result["redone_steps"] == 0  # each allocation saved at the signal: nothing lost
    assert json.loads((run / "progress.json").read_text())["high_water"] == STEPS
    for a, b in zip(jobs, jobs[1:], strict=False):
        assert f"job {a} ended at its time limit; the training continues in job {b}" in err, err[-3000:]
    resumed = set(re.findall(r"resumed from step (\d+) \(0 steps redone\)", out))  # a line per worker
    assert len(resumed) == 2, out[-3000:]
    # The last allocation queued none; all three ended well; nothing else was submitted or left.
    assert not (testbed.job_dir(jobs[2]) / "chain-next").exists()
    assert sacct_states(testbed, jobs) == dict.fromkeys(jobs, "COMPLETED")
    assert set(all_job_ids(testbed)) - before == {int(j) for j in jobs}
    for job in jobs:
        assert_no_leaks(job)


def test_a_chain_ends_where_the_training_ends_and_down_cancels_what_is_queued(testbed):
    before = set(all_job_ids(testbed))
    extra = ("--chain", "5", "--signal-before", "30", "--no-requeue", "--time", "10")
    proc, job = start_training(testbed, nodes=2, steps=60, extra=extra)
    rc, result, out, err = finish(proc)
    assert rc == 0 and result["final_step"] == 60, out[-3000:] + err[-3000:]
    nxt = re.search(r"allocation 1 of 5; the next one is queued as job (\d+)", out).group(1)
    assert f"the chain ends here (exit code 0): cancelled the queued job {nxt}" in out
    states = sacct_states(testbed, [job, nxt])
    assert states[job] == "COMPLETED" and states[nxt].startswith("CANCELLED"), states
    # (sacct's time window leaves out a job cancelled before it was ever eligible)
    assert {int(job)} <= set(all_job_ids(testbed)) - before <= {int(job), int(nxt)}
    # `down` on a running chained job cancels the allocation queued behind it too.
    proc, job = start_training(testbed, nodes=2, steps=100000, extra=extra)
    wait_progress(testbed, run_dir(testbed, job), 20, proc)
    nxt = wait_file(testbed.job_dir(job) / "chain-next")
    down = testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
    assert down.returncode == 0, down.stderr
    finish(proc)
    states = sacct_states(testbed, [job, nxt])
    assert states[nxt].startswith("CANCELLED"), states
    assert_no_leaks(job)
