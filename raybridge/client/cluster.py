"""A handle to one running (or ended) raybridge cluster: wait until ready, follow, stop.

Library API (the CLI is a thin layer over it):

    spec = load_spec("mysite", nodes=4)
    runner = open_runner(spec.login)                 # connect.py: local, or SSH to the login node
    cluster = submission.submit(spec, runner)        # or attach(spec, runner, job_id)
    info = cluster.wait_ready(on_progress=print)
    print(status.of(cluster).line())
    cluster.stop()
"""

from __future__ import annotations

import codecs
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from raybridge import envcheck, trust
from raybridge import jobdir as jd
from raybridge.client.profile import ClusterSpec
from raybridge.errors import ClusterError, JobNotFound, RaybridgeError
from raybridge.layout import SharedDir
from raybridge.members import Members
from raybridge.slurm import Accounting, JobInfo, SlurmClient
from raybridge.transport.runner import Runner

POLL = 0.5  # seconds between Slurm queries while waiting for a cluster
FOLLOW_EVERY = {"local": 0.1, "ssh": 0.2}  # seconds between reads of a followed log or record
JOB_EVERY = 1.0  # seconds between Slurm queries while following a log
CHUNK = 1 << 20
REQUEUE_MARGIN = 3.0
TRUST_EVERY = 0.5  # seconds between checks of a job folder that is not there yet  # seconds after a requeue before moving the job's begin time to now


@dataclass(frozen=True)
class Progress:
    job_id: str
    phase: str  # queued | starting | joining | services | ready (| alive: a batch run's end)
    slurm_state: str
    reason: str
    joined: int
    expected: int
    elapsed: float

    def line(self) -> str:
        t = f"{self.elapsed:5.1f}s"
        if self.phase == "queued":
            why = f" (reason: {self.reason})" if self.reason and self.reason != "None" else ""
            return f"[{t}] job {self.job_id}: {self.slurm_state.lower()}{why}"
        if self.phase == "ready":
            return f"[{t}] job {self.job_id}: all {self.expected} nodes joined, cluster ready"
        if self.phase == "alive":
            return f"[{t}] job {self.job_id}: all {self.expected} nodes alive"
        if self.phase == "starting":
            return f"[{t}] job {self.job_id}: running, starting Ray head"
        if self.phase == "services":
            return (
                f"[{t}] job {self.job_id}: all {self.expected} nodes alive, starting dashboard and Ray Client"
            )
        return f"[{t}] job {self.job_id}: nodes joined {self.joined}/{self.expected}"


class Cluster:
    """A handle to one raybridge job, wherever its login node is."""

    def __init__(
        self,
        runner: Runner,
        job_id: str,
        job_dir: str,
        expected: int | None = None,
        submitted_at: float | None = None,
    ):
        self.runner = runner
        self.slurm = SlurmClient(runner)
        self.job_id = job_id
        self.job_dir = job_dir
        self.dir = jd.JobDir(job_dir)
        self.expected = expected
        self.submitted_at = submitted_at  # set by submit(): older records are a previous job's
        self.python: str | None = None  # the job's interpreter, when submit() knows it
        self.image: str | None = None  # the job's container image, when it runs in one
        self.trusted_at: float | None = None  # when the job folder passed the trust rule
        self.checked_at = -1e9

    @property
    def layout(self) -> SharedDir:
        return SharedDir.of_job_dir(self.job_dir)

    @property
    def members(self) -> Members:
        """The cluster's member jobs (`raybridge scale`, replacements, the autoscaler's)."""
        return Members(self.runner, self.dir, self.job_id, self.slurm)

    def trusted(self) -> bool:
        """Whether the job folder passes the trust rule (trust.py: yours, and nobody else can write it or
        a folder above it unless sticky), checked once it exists; ClusterError when it does not pass.
        Its records say where the head is: a planted one would send the token elsewhere."""
        if self.trusted_at is not None:
            return True
        if time.monotonic() - self.checked_at < TRUST_EVERY:
            return False
        self.checked_at = time.monotonic()
        try:
            why = trust.chain_problem(lambda argv: self.runner.run(argv).stdout, self.job_dir)
        except (RaybridgeError, ValueError):
            return False  # not there yet
        if why:
            raise ClusterError(f"job {self.job_id}: not using its folder: {why}")
        self.trusted_at = time.monotonic()
        return True

    def info(self) -> jd.ClusterRecord | None:
        """The cluster record, or None before the job wrote it (or when it is a previous job's with
        the same id: Slurm's ids start again after a controller reset)."""
        if not self.trusted():
            return None
        rec = jd.parse(self.runner.read_text(self.dir.cluster), jd.ClusterRecord, self.dir.cluster)
        if rec and self.submitted_at and (rec.submitted_at or 0) < self.submitted_at - 1:
            return None
        return rec

    def job(self) -> JobInfo | None:
        return self.slurm.job(self.job_id)

    def accounting(self, settle: float = 5.0) -> Accounting | None:
        """sacct's record of the job, its member jobs' added; after its end, waits up to `settle` s
        for the final one (the controller hands it to slurmdbd a moment after the job ended)."""
        deadline = time.monotonic() + settle
        while True:
            acct = self.slurm.accounting(self.job_id)
            if acct is None or not acct.running or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for rec in self.members.records() if acct else ():
            if member := self.slurm.accounting(rec.job_id):
                acct = acct.plus(member)
        return acct

    def joined(self) -> int:
        return sum(1 for n in self.runner.listdir(self.dir.nodes) if n.endswith(".json"))

    def log_path(self, job: JobInfo | None = None) -> str:
        job = job or self.job()
        return job.stdout if job and job.stdout else ""

    def log_tail(self, lines: int = 15) -> str:
        path = self.log_path()
        text = self.runner.read_text(path) if path else None
        if not text:
            return f"(no job output at {path or 'unknown path'})"
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def wait_ready(
        self,
        timeout: float | None = 900,
        on_progress: Callable[[Progress], None] | None = None,
        ended_ok: bool = False,
        until: str = "ready",
    ) -> jd.ClusterRecord:
        """Block until every node joined; on failure or timeout cancel the job and raise ClusterError.
        until="alive" (batch runs): return once every node is alive, when the driver starts, not once
        the dashboard and Ray Client answer too. ended_ok (batch runs): a cluster that was up and has
        ended since counts: a quick driver may be done before this looks; the job's output and exit
        code tell the rest."""
        start = time.monotonic()
        last: Progress | None = None
        every = FOLLOW_EVERY["ssh" if self.runner.host else "local"]  # the cluster record: one small read
        job, asked = None, -1e9
        while True:
            elapsed = time.monotonic() - start
            if job is None or time.monotonic() - asked >= POLL:  # Slurm: a controller RPC each time
                job, asked = self.job(), time.monotonic()
            if job is None:
                raise ClusterError(f"job {self.job_id} disappeared from Slurm before the cluster was ready")
            info = self.info()
            state = info.state if info else "starting"
            expected = int((info.expected_nodes if info else 0) or self.expected or 0)
            alive = bool(info and (info.nodes_alive_at or info.ready_at))
            if info and (
                state == "ready"
                or (until == "alive" and state == "starting" and alive)
                or (ended_ok and job.finished and alive)
            ):
                phase = "ready" if until == "ready" else "alive"
                self._report(
                    on_progress,
                    last,
                    Progress(self.job_id, phase, job.slurm_state, job.reason, expected, expected, elapsed),
                )
                return info
            if state == "failed" or job.finished:
                why = (info.error if info else None) or f"job ended ({job.slurm_state}, reason {job.reason})"
                self._cancel_quietly(job)
                if env := self.environment_error(job):  # the nodes' Python: one line with the fix
                    raise ClusterError(f"cluster {self.job_id} failed: {env}")
                raise ClusterError(
                    f"cluster {self.job_id} failed: {why}\n--- job output (tail) ---\n{self.log_tail()}"
                )
            if timeout and elapsed > timeout:
                self._cancel_quietly(job)
                raise ClusterError(
                    f"cluster {self.job_id} not ready after {timeout:.0f}s "
                    f"({job.slurm_state}, reason {job.reason}); job cancelled\n"
                    f"--- job output (tail) ---\n{self.log_tail()}"
                )
            if job.state == "pending" or job.state == "suspended":
                p = Progress(self.job_id, "queued", job.slurm_state, job.reason, 0, expected, elapsed)
            elif not (info and info.head):
                p = Progress(self.job_id, "starting", job.slurm_state, job.reason, 0, expected, elapsed)
            elif info.nodes_alive_at:
                p = Progress(
                    self.job_id, "services", job.slurm_state, job.reason, expected, expected, elapsed
                )
            else:
                p = Progress(
                    self.job_id, "joining", job.slurm_state, job.reason, self.joined(), expected, elapsed
                )
            last = self._report(on_progress, last, p)
            time.sleep(POLL if p.phase == "queued" else every)

    def environment_error(self, job: JobInfo | None) -> str | None:
        """The job's own line saying its Python cannot run raybridge, if it wrote one."""
        path = self.log_path(job)
        text = self.runner.read_text(path) if path else None
        return envcheck.find_error(text or "", self.python, self.image)

    @staticmethod
    def _report(cb: Callable[[Progress], None] | None, last: Progress | None, p: Progress) -> Progress:
        changed = last is None or (p.phase, p.slurm_state, p.reason, p.joined) != (
            last.phase,
            last.slurm_state,
            last.reason,
            last.joined,
        )
        if cb and changed:
            cb(p)
        return p if changed else last  # type: ignore[return-value]

    def _cancel_quietly(self, job: JobInfo) -> None:
        if not job.finished:
            self.slurm.cancel(self.job_id)

    def chain_next(self) -> str | None:
        """`run --chain`: the next allocation's job id, while it is still queued or running."""
        text = (self.runner.read_text(self.dir.chain_next) or "").strip()
        if not text.isdigit():
            return None
        job = self.slurm.job(text)
        return text if job is not None and not job.finished else None

    def stop(self, timeout: float = 60) -> str:
        """Ask the agents to tear down (they stop only this job's Ray), then make sure the job is
        gone. Idempotent. Returns what happened, for the CLI."""
        with contextlib.suppress(RaybridgeError, OSError):  # `run --chain`: nothing queued after it
            if nxt := self.chain_next():
                self.slurm.cancel(nxt)
        job = self.job()
        self._forget_targets()
        if job is None or job.finished:
            gone = self.members.cancel_all()
            return "already stopped" + (f" (cancelled member jobs {', '.join(gone)})" if gone else "")
        if job.state == "pending":
            self.slurm.cancel(self.job_id)
        else:
            with contextlib.suppress(OSError):  # no job folder yet: scancel below does it
                self.runner.write_text(self.dir.stop, "", mode=0o600)
        deadline = time.monotonic() + timeout
        cancelled = job.state == "pending"
        grace = time.monotonic() + 15
        while time.monotonic() < deadline:
            job = self.job()
            if job is None or job.finished:
                gone = self.members.cancel_all()  # their agents saw the stop flag; this makes sure
                return "stopped" + (f" (and member jobs {', '.join(gone)})" if gone else "")
            if not cancelled and time.monotonic() > grace:
                self.slurm.cancel(self.job_id)  # agents tear down on SIGTERM too
                cancelled = True
            time.sleep(POLL)
        raise ClusterError(f"job {self.job_id} did not end within {timeout:.0f}s of the stop request")

    def _forget_targets(self) -> None:
        """Prometheus stops scraping a stopped cluster even when its head could not say so (crashed)."""
        with contextlib.suppress(Exception):
            self.runner.run(["rm", "-f", "--", self.layout.sd_file(self.job_id)], check=False)

    def follow_output(
        self,
        write: Callable[[str], None],
        until_done: bool = True,
        on_requeue: Callable[[str], None] | None = None,
    ) -> JobInfo | None:
        """Stream the job's output until the job ends; returns the final job record.

        The log is read from where the last read ended, FOLLOW_EVERY apart (one small read each: a
        local read, or one SFTP request on a file kept open); Slurm is asked about the job only every
        JOB_EVERY, which is how long the end of a job may take to notice. A job that ran and is held
        after a requeue (reason BeginTime) is started at once (SlurmClient.start_now); on_requeue
        gets a line saying so."""
        every = FOLLOW_EVERY["ssh" if self.runner.host else "local"]
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset, path, job, asked, ran = 0, "", None, -1e9, False
        held_since: float | None = None
        while True:
            ended = False
            if time.monotonic() - asked >= JOB_EVERY:
                job, asked = self.job(), time.monotonic()
                path = self.log_path(job) or path
                ended = job is None or job.finished or not until_done
                ran = ran or bool(job and job.state == "running")
                requeued = bool(ran and job and job.state == "pending" and job.reason == "BeginTime")
                held_since = (held_since or time.monotonic()) if requeued else None
                # Not in the second of the requeue: Slurm revoked the previous start's credential then,
                # and refuses a start whose new credential carries that same second.
                if job and held_since and on_requeue and time.monotonic() - held_since >= REQUEUE_MARGIN:
                    held = f" until {job.eligible_time}" if job.eligible_time[:1].isdigit() else ""
                    if self.slurm.start_now(self.job_id):
                        ran, held_since = False, None
                        on_requeue(
                            f"job {self.job_id} was requeued and held{held} for Slurm's credential expiry; "
                            "starting it now"
                        )
                    else:  # refused (e.g. still the second of the requeue): again after another margin
                        held_since = time.monotonic()
            while path and (data := self.runner.read_from(path, offset, CHUNK)):
                offset += len(data)
                write(decode.decode(data))
                if len(data) < CHUNK:
                    break
            if ended:  # read after Slurm said so: nothing the job wrote is missed
                if tail := decode.decode(b"", final=True):
                    write(tail)
                return job
            time.sleep(every)


class ProgramOutput:
    """The job log as `run` shows it: the program's output; raybridge's own lines (every agent's and the
    driver launcher's `raybridge[host/role] ...`, the environment check, the driver's exit line) stay
    in the job log. A partial line is held only while it could still become one of those: a progress
    bar without a newline shows at once."""

    OWN = ("raybridge[", "raybridge: environment ok", "raybridge: driver exited with code")

    def __init__(self, write: Callable[[str], None]):
        self.write = write
        self.held = ""

    def __call__(self, text: str) -> None:
        lines = (self.held + text).split("\n")
        self.held = lines.pop()
        shown = [line + "\n" for line in lines if not line.startswith(self.OWN)]
        if self.held and not any(o.startswith(self.held[: len(o)]) for o in self.OWN):
            shown.append(self.held)  # cannot become one of ours: no reason to wait for its newline
            self.held = ""
        if shown:
            self.write("".join(shown))

    def flush(self) -> None:
        if self.held and not self.held.startswith(self.OWN):
            self.write(self.held)
        self.held = ""


def job_dir_for(spec: ClusterSpec, runner: Runner, job_id: str, job: JobInfo | None = None) -> str:
    """The job's folder: under the profile's shared_dir, or next to the script Slurm ran."""
    spec = spec.with_home(runner.home())
    candidate = spec.job_dir(job_id)
    if job and job.command and runner.read_text(jd.JobDir(candidate).cluster) is None:
        other = jd.JobDir(SharedDir.of_script(job.command).job(job_id))
        if runner.read_text(other.cluster) is not None:
            return other.path
    return candidate


def attach(spec: ClusterSpec, runner: Runner, job_id: str | None = None) -> Cluster:
    """A handle to an existing job (the newest raybridge job of this user when job_id is None)."""
    slurm = SlurmClient(runner)
    if job_id is None:
        jobs = slurm.my_jobs()
        if not jobs:
            raise JobNotFound("no running raybridge job (raybridge up starts one)")
        job = max(jobs, key=lambda j: int(j.job_id.split("_")[0]))
        job_id = job.job_id
    else:
        if not job_id.isdigit():
            raise JobNotFound(f"not a Slurm job id: {job_id!r}")
        job = slurm.job(job_id)
        if job is None:
            raise JobNotFound(f"no such job: {job_id}")
        if job.comment != "raybridge":
            raise JobNotFound(f"job {job_id} is not a raybridge job")
        if job.user and job.user != slurm.user():
            # Its folder is not ours to read, its Ray not ours to reach: say so before trying.
            raise JobNotFound(f"job {job_id} belongs to {job.user}: raybridge acts only on your own jobs")
    return Cluster(runner, job_id, job_dir_for(spec, runner, job_id, job))


def mine(spec: ClusterSpec, runner: Runner) -> list[Cluster]:
    """Handles to every raybridge cluster of this user that Slurm still lists."""
    return [
        Cluster(runner, j.job_id, job_dir_for(spec, runner, j.job_id, j))
        for j in SlurmClient(runner).my_jobs()
    ]
