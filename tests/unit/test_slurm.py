import pytest

from raybridge.errors import CommandError, SlurmError
from raybridge.slurm import STATES, SlurmClient, job_from_fields, parse_scontrol
from raybridge.transport.runner import Result

LINE = (
    "JobId=42 JobName=raybridge UserId=root(0) GroupId=root(0) Priority=1 JobState=PENDING "
    "Reason=Resources Dependency=(null) ExitCode=0:0 NodeList=(null) Command=/home/a b/s.sbatch "
    "WorkDir=/home/a b StdOut=/shared/logs/raybridge-42.out Comment=raybridge"
)


class FakeRunner:
    host = ""

    def __init__(self, results):
        self.results = list(results)
        self.calls = []

    def run(self, argv, *, input=None, check=True, timeout=60, env=None):
        self.calls.append((argv, env))
        rc, out, err = self.results.pop(0)
        if check and rc:
            raise CommandError(argv, rc, out, err)
        return Result(argv, rc, out, err)


def test_parse_scontrol_keeps_values_with_spaces():
    f = parse_scontrol(LINE)
    assert f["Command"] == "/home/a b/s.sbatch"
    assert f["WorkDir"] == "/home/a b"
    job = job_from_fields(f)
    assert (job.job_id, job.state, job.reason, job.comment) == ("42", "pending", "Resources", "raybridge")
    assert job.stdout == "/shared/logs/raybridge-42.out"
    assert job.user == "root"


@pytest.mark.parametrize(("code", "expected"), [("0:0", 0), ("3:0", 3), ("0:9", 137)])
def test_exit_codes(code, expected):
    assert job_from_fields({"ExitCode": code, "JobState": "FAILED"}).exit_code == expected


# Every job state Slurm 22.05 reports (squeue(1), JOB STATE CODES), with what raybridge must make of it.
SLURM_22_05 = {
    "BOOT_FAIL": "failed",
    "CANCELLED": "cancelled",
    "COMPLETED": "completed",
    "CONFIGURING": "pending",
    "COMPLETING": "ending",
    "DEADLINE": "failed",
    "FAILED": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "PENDING": "pending",
    "PREEMPTED": "preempted",
    "RUNNING": "running",
    "RESV_DEL_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUED": "pending",
    "RESIZING": "running",
    "REVOKED": "failed",
    "SIGNALING": "running",
    "SPECIAL_EXIT": "pending",
    "STAGE_OUT": "running",
    "STOPPED": "suspended",
    "SUSPENDED": "suspended",
    "TIMEOUT": "failed",
}
ENDED = {
    s for s, coarse in SLURM_22_05.items() if coarse in {"completed", "cancelled", "failed", "preempted"}
}


def test_every_slurm_state_maps():
    assert STATES == SLURM_22_05
    for state, coarse in SLURM_22_05.items():
        job = job_from_fields({"JobState": state})
        assert job.state == coarse and job.finished == (state in ENDED), state


class FakeSlurm:
    """Slurm as the cluster handle sees it: one job in a given state; records cancels."""

    def __init__(self, state):
        self.state = state
        self.cancelled = []

    def job(self, job_id):
        from raybridge.slurm import JobInfo

        return JobInfo(job_id, "raybridge", self.state, "None", "n1", "", None, "raybridge")

    def cancel(self, job_id, signal=None, batch_only=False):
        self.cancelled.append(job_id)
        self.state = "CANCELLED"


def record_of(tmp_path, **fields):
    """A cluster record as the agents write it (jobdir.ClusterRecord), with these fields."""
    from raybridge import jobdir as jd

    base = jd.ClusterRecord(job_id="42", state="starting", expected_nodes=2, job_dir=str(tmp_path))
    return base.with_changes(**fields).to_dict()


def cluster_in(tmp_path, state, record=None):
    import json

    from raybridge.client.cluster import Cluster
    from raybridge.transport.runner import LocalRunner

    if record is not None:
        (tmp_path / "cluster.json").write_text(json.dumps(record_of(tmp_path, **record)))
    (tmp_path / "nodes").mkdir(exist_ok=True)
    cluster = Cluster(LocalRunner(), "42", str(tmp_path), expected=2)
    cluster.slurm = FakeSlurm(state)
    return cluster


@pytest.mark.parametrize("state", sorted(ENDED))
def test_wait_ready_ends_on_every_final_state(tmp_path, state):
    from raybridge.errors import ClusterError

    cluster = cluster_in(tmp_path, state)
    with pytest.raises(ClusterError, match=f"cluster 42 failed: job ended \\({state}"):
        cluster.wait_ready(timeout=5)
    assert cluster.slurm.cancelled == []  # nothing left to cancel


@pytest.mark.parametrize("state", sorted(set(SLURM_22_05) - ENDED))
def test_wait_ready_keeps_waiting_in_every_live_state_and_cancels_at_the_timeout(
    tmp_path, state, monkeypatch
):
    from raybridge.client import cluster as cluster_mod
    from raybridge.errors import ClusterError

    monkeypatch.setattr(cluster_mod, "POLL", 0.01)
    cluster = cluster_in(tmp_path, state)
    with pytest.raises(ClusterError, match="not ready after"):
        cluster.wait_ready(timeout=0.05)
    assert cluster.slurm.cancelled == ["42"]


def test_a_running_job_whose_agents_report_failure_is_cancelled(tmp_path):
    from raybridge.errors import ClusterError

    cluster = cluster_in(tmp_path, "RUNNING", {"state": "failed", "error": "node n2 never joined"})
    with pytest.raises(ClusterError, match="cluster 42 failed: node n2 never joined"):
        cluster.wait_ready(timeout=5)
    assert cluster.slurm.cancelled == ["42"]


def test_submit_parses_id_and_passes_env():
    r = FakeRunner([(0, "123;cluster\n", "")])
    assert SlurmClient(r).submit("/s.sbatch", ["--output=x"], env={"A": "1"}) == "123"
    assert r.calls[0] == (["sbatch", "--parsable", "--output=x", "/s.sbatch"], {"A": "1"})


def test_submit_rejection_shows_sbatch_stderr():
    r = FakeRunner(
        [
            (
                1,
                "",
                "sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed\n",
            )
        ]
    )
    with pytest.raises(
        SlurmError, match="sbatch rejected the job: sbatch: error: invalid partition specified: nope"
    ):
        SlurmClient(r).submit("/s.sbatch")


def test_unknown_job_is_none():
    r = FakeRunner([(1, "", "slurm_load_jobs error: Invalid job id specified\n")])
    assert SlurmClient(r).job("99") is None


def test_a_batch_run_whose_driver_ended_before_it_looked_counts_as_ready(tmp_path, monkeypatch):
    import json

    from raybridge.client.cluster import Cluster
    from raybridge.errors import ClusterError
    from raybridge.slurm import JobInfo
    from raybridge.transport.runner import LocalRunner

    # The cluster was ready, the driver exited 3 and the job is over before the first poll.
    (tmp_path / "cluster.json").write_text(json.dumps(record_of(tmp_path, state="stopped", ready_at=1.0)))
    (tmp_path / "out").write_text("driver output\n")
    done = JobInfo(
        "42", "raybridge", "FAILED", "NonZeroExitCode", "n[1-2]", str(tmp_path / "out"), 3, "raybridge"
    )
    cluster = Cluster(LocalRunner(), "42", str(tmp_path))
    monkeypatch.setattr(cluster.slurm, "job", lambda _id: done)
    assert cluster.wait_ready(ended_ok=True).ready_at == 1.0  # `run`: go on to the output and exit code
    with pytest.raises(ClusterError, match="cluster 42 failed: job ended"):
        cluster.wait_ready()  # `up`: a cluster that is gone is not ready
    # Never ready: a failure either way.
    (tmp_path / "cluster.json").write_text(json.dumps(record_of(tmp_path, state="failed", error="boom")))
    with pytest.raises(ClusterError, match="cluster 42 failed: boom"):
        cluster.wait_ready(ended_ok=True)


def test_sacct_is_summed_over_starts_and_leaves_out_steps():
    from raybridge.slurm import parse_duration, parse_sacct

    text = "7|REQUEUED|100|2|4|01:00.000\n7.batch|CANCELLED|100|1|2|00:10\n7|COMPLETED|50|2|4|00:02:30\n17|COMPLETED|9|1|1|0:01\n"
    a = parse_sacct(text, "7")
    assert (a.state, a.starts, a.elapsed_s, a.node_s, a.alloc_cpu_s, a.total_cpu_s) == (
        "COMPLETED",
        2,
        150,
        300,
        600,
        210,
    )
    assert a.cpu_efficiency == 210 / 600 and "35%" in a.line() and "2 starts" in a.line()
    # A job that lost a node and went on (--no-kill): Slurm keeps one record per size.
    resized = parse_sacct(
        "9|RESIZING|30|3|6|00:00:00\n9.0|RESIZING|29|3|6|0:01\n9|COMPLETED|52|2|4|00:03.800\n", "9"
    )
    assert (resized.starts, resized.resizes, resized.node_s) == (1, 1, 30 * 3 + 52 * 2)
    assert "1 resize (a lost node)" in resized.line() and "starts" not in resized.line()
    assert parse_sacct("", "7") is None and parse_sacct("junk|x", "7") is None
    assert parse_duration("1-02:03:04.5") == 93784.5 and parse_duration("bad") == 0.0
    running = parse_sacct("8|RUNNING|20|1|2|00:00:00\n", "8")
    assert running.running and "once the job ends" in running.line()


def test_attach_refuses_another_users_job_in_one_line():
    from raybridge.client.cluster import attach
    from raybridge.client.profile import ClusterSpec
    from raybridge.errors import JobNotFound

    class Runner(FakeRunner):  # enough of a login node for attach to go on, were the job alice's
        def home(self):
            return "/home/alice"

        def read_text(self, path):
            return None

    line = LINE.replace("UserId=root(0)", "UserId=bob(1002)")
    runner = Runner([(0, line + "\n", ""), (0, "alice\n", "")])
    with pytest.raises(JobNotFound, match=r"^job 42 belongs to bob: raybridge acts only on your own jobs$"):
        attach(ClusterSpec(), runner, "42")
    # Nothing of the job was read: no folder, no record, no token.
    assert [argv[0] for argv, _ in runner.calls] == ["scontrol", "id"]
