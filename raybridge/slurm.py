"""Slurm client over a Runner: submit, inspect, cancel. Parses machine output into small records.

The one Slurm client: the CLI uses it over a LocalRunner or an SSH connection, the agents and the
head's autoscaler over a LocalRunner inside the allocation. Slurm's job states are mapped here, once.
"""

from __future__ import annotations

import dataclasses
import re
import time as clock
from dataclasses import dataclass

from raybridge.errors import CommandError, SlurmError
from raybridge.settings import SUBMITTED_AT_VAR
from raybridge.transport.runner import Runner

# Every Slurm job state → raybridge's coarse state.
STATES = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "RESV_DEL_HOLD": "pending",
    "SPECIAL_EXIT": "pending",
    "RUNNING": "running",
    "RESIZING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
    "COMPLETING": "ending",
    "SUSPENDED": "suspended",
    "STOPPED": "suspended",
    "COMPLETED": "completed",
    "CANCELLED": "cancelled",
    "PREEMPTED": "preempted",
    "FAILED": "failed",
    "TIMEOUT": "failed",
    "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
    "OUT_OF_MEMORY": "failed",
    "REVOKED": "failed",
}
FINISHED = {"completed", "cancelled", "failed", "preempted"}
# A job that ended because it, or a node of it, was lost (not because its program ended).
LOST = frozenset(s for s, coarse in STATES.items() if coarse in FINISHED - {"completed"})
JOB_ID = re.compile(r"^\d+(_\d+)?$")
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){1,2}$")  # squeue's %L: [D-]HH:MM:SS or MM:SS
FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9/:_]*)=")


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    name: str
    slurm_state: str
    reason: str
    nodelist: str
    stdout: str
    exit_code: int | None
    comment: str
    command: str = ""
    eligible_time: str = ""  # the earliest it may start (a requeued job's hold ends then): ISO time
    user: str = ""  # who owns it (user name; "" where Slurm did not say)

    @property
    def state(self) -> str:
        return STATES.get(self.slurm_state, "unknown")

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


def finished(slurm_state: str) -> bool:
    """A Slurm state name (squeue's %T, sacct's State) of a job that has ended."""
    return STATES.get(slurm_state.split()[0] if slurm_state else "", "unknown") in FINISHED


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o` → {key: value}. Values may contain spaces (Command=, WorkDir=)."""
    text = text.strip()
    matches = list(FIELD.finditer(text))
    out = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out[m.group(1)] = text[m.end() : end].strip()
    return out


def job_from_fields(f: dict[str, str]) -> JobInfo:
    exit_code = None
    if ":" in f.get("ExitCode", ""):
        code, sig = f["ExitCode"].split(":", 1)
        exit_code = int(code) if code.isdigit() else None
        if sig.isdigit() and int(sig) and not exit_code:
            exit_code = 128 + int(sig)
    return JobInfo(
        job_id=f.get("JobId", ""),
        name=f.get("JobName", ""),
        slurm_state=f.get("JobState", "UNKNOWN").split()[0],
        reason=f.get("Reason", "None"),
        nodelist=f.get("NodeList", "(null)"),
        stdout=f.get("StdOut", ""),
        exit_code=exit_code,
        comment=f.get("Comment", "(null)"),
        command=f.get("Command", ""),
        eligible_time=f.get("EligibleTime", ""),
        user=f.get("UserId", "").split("(")[0],
    )


@dataclass(frozen=True)
class Accounting:
    """What Slurm's accounting (sacct) knows of a job, summed over its records (a requeued job has
    one per start; a job that lost a node and went on has one per size)."""

    state: str  # of the newest record
    starts: int
    resizes: int
    elapsed_s: int
    node_s: int  # elapsed x nodes
    alloc_cpu_s: int  # elapsed x allocated CPUs
    total_cpu_s: float  # CPU time used by every step (complete once the steps ended)
    member_jobs: int = 0  # member jobs (scale, replacements, the autoscaler) counted in too

    def plus(self, member: Accounting) -> Accounting:
        """This cluster's figures with a member job's added (the state stays the cluster's)."""
        return dataclasses.replace(
            self,
            node_s=self.node_s + member.node_s,
            alloc_cpu_s=self.alloc_cpu_s + member.alloc_cpu_s,
            total_cpu_s=round(self.total_cpu_s + member.total_cpu_s, 3),
            member_jobs=self.member_jobs + 1,
        )

    @property
    def node_hours(self) -> float:
        return self.node_s / 3600

    @property
    def cpu_efficiency(self) -> float | None:
        """Used CPU time / allocated CPU time (None before any time was allocated)."""
        return self.total_cpu_s / self.alloc_cpu_s if self.alloc_cpu_s else None

    @property
    def running(self) -> bool:
        return STATES.get(self.state.split()[0], "unknown") in ("pending", "running", "ending")

    def line(self) -> str:
        starts = f", {self.starts} starts" if self.starts > 1 else ""
        starts += (
            f", {self.resizes} resize{'s' if self.resizes > 1 else ''} (a lost node)" if self.resizes else ""
        )
        if self.member_jobs:
            starts += f", {self.member_jobs} member job{'s' if self.member_jobs > 1 else ''} included"
        text = f"{self.node_hours:.4f} node-hours ({self.node_s} node-seconds{starts})"
        if self.running:
            return text + ", CPU efficiency once the job ends (sacct)"
        eff = self.cpu_efficiency
        return text + (f", CPU efficiency {eff:.0%}" if eff is not None else "") + " (sacct)"

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "starts": self.starts,
            "resizes": self.resizes,
            "elapsed_s": self.elapsed_s,
            "node_hours": round(self.node_hours, 6),
            "cpu_efficiency": None if self.cpu_efficiency is None else round(self.cpu_efficiency, 4),
            "total_cpu_s": self.total_cpu_s,
            "member_jobs": self.member_jobs,
            "summary": self.line(),
        }


def parse_duration(text: str) -> float:
    """sacct's [DD-][HH:]MM:SS[.mmm] as seconds; 0 for anything else."""
    days, _, rest = text.strip().rpartition("-")
    try:
        seconds = sum(float(v) * 60**i for i, v in enumerate(reversed(rest.split(":"))))
        return seconds + (int(days) * 86400 if days else 0)
    except ValueError:
        return 0.0


def parse_sacct(text: str, job_id: str) -> Accounting | None:
    """The job's own lines of `sacct -D -P -n -o JobID,State,ElapsedRaw,NNodes,AllocCPUS,TotalCPU`
    (one per start; its steps' lines are left out), summed."""
    rows = []
    for line in text.splitlines():
        f = line.split("|")
        if len(f) == 6 and f[0] == job_id and f[2].isdigit() and f[3].isdigit() and f[4].isdigit():
            rows.append((f[1], int(f[2]), int(f[3]), int(f[4]), parse_duration(f[5])))
    if not rows:
        return None
    return Accounting(
        state=rows[-1][0],
        starts=1 + sum(1 for r in rows[:-1] if r[0].startswith("REQUEUE")),
        resizes=sum(1 for r in rows[:-1] if r[0].startswith("RESIZING")),
        elapsed_s=sum(r[1] for r in rows),
        node_s=sum(r[1] * r[2] for r in rows),
        alloc_cpu_s=sum(r[1] * r[3] for r in rows),
        total_cpu_s=round(sum(r[4] for r in rows), 3),
    )


@dataclass(frozen=True)
class Submitted:
    job_id: str
    submitted_at: float  # epoch seconds, when sbatch was called


class SlurmClient:
    def __init__(self, runner: Runner):
        self.runner = runner
        self._user: str | None = None

    def submit(
        self,
        script_path: str | None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        text: str | None = None,
    ) -> str:
        """sbatch a script file, or (script_path None) the script's text on sbatch's standard input."""
        argv = ["sbatch", "--parsable", *(args or []), *([script_path] if script_path else [])]
        try:
            out = self.runner.run(argv, env=env, timeout=120, input=text).stdout.strip()
        except CommandError as e:
            msg = (
                " ".join(line.strip() for line in (e.stderr or e.stdout).strip().splitlines()) or "no output"
            )
            raise SlurmError(f"sbatch rejected the job: {msg}") from None
        job_id = out.split(";")[0].strip()
        if not JOB_ID.match(job_id):
            raise SlurmError(f"sbatch printed no job id: {out!r}")
        return job_id

    def submit_text(self, script: str, output: str, time: str | None = None) -> Submitted:
        """sbatch a script raybridge rendered, as those very bytes (on sbatch's standard input: never
        re-read from a path someone else could write): its output to `output` (layout's), an optional
        time limit (a member job gets its cluster's remaining time), and the submission time in the
        job's environment (the cluster record's start: settings.SUBMITTED_AT_VAR)."""
        submitted_at = round(clock.time(), 3)
        args = [f"--output={output}"] + ([f"--time={time}"] if time else [])
        job_id = self.submit(None, args, env={SUBMITTED_AT_VAR: f"{submitted_at:.3f}"}, text=script)
        return Submitted(job_id, submitted_at)

    def user(self) -> str:
        if self._user is None:
            self._user = self.runner.run(["id", "-un"]).stdout.strip()
        return self._user

    def job(self, job_id: str) -> JobInfo | None:
        """The job's record, or None once Slurm has forgotten it (or never knew it)."""
        r = self.runner.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if r.returncode != 0:
            if "Invalid job id" in r.stderr or "Invalid job id" in r.stdout:
                return None
            raise CommandError(r.argv, r.returncode, r.stdout, r.stderr, host=self.runner.host)
        lines = [line for line in r.stdout.splitlines() if line.strip()]
        return job_from_fields(parse_scontrol(lines[0])) if lines else None

    def my_jobs(self) -> list[JobInfo]:
        """This user's jobs that raybridge started (marked by --comment=raybridge)."""
        r = self.runner.run(["squeue", "-h", "-u", self.user(), "-o", "%i"])
        jobs = []
        for job_id in r.stdout.split():
            info = self.job(job_id)
            if info and info.comment == "raybridge":
                jobs.append(info)
        return jobs

    def accounting(self, job_id: str) -> Accounting | None:
        """sacct's view of the job; None where accounting is off or does not know the job."""
        fields = "JobID,State,ElapsedRaw,NNodes,AllocCPUS,TotalCPU"
        try:
            r = self.runner.run(
                ["sacct", "-j", job_id, "-n", "-P", "-D", "-o", fields], check=False, timeout=30
            )
        except CommandError:  # no sacct on this login node, or it hung
            return None
        return parse_sacct(r.stdout, job_id) if r.returncode == 0 else None

    def start_now(self, job_id: str) -> bool:
        """Let a requeued job start as soon as nodes are free: Slurm holds it (reason BeginTime) for
        its credential lifetime plus a margin (`AuthInfo=cred_expire`, 120 s by default) after the
        requeue; the job's owner may move its begin time. False if Slurm refused."""
        r = self.runner.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        return r.returncode == 0

    def cancel(self, job_id: str, signal: str | None = None, batch_only: bool = False) -> None:
        argv = ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        if batch_only:
            argv.append("--batch")
        self.runner.run([*argv, "--", job_id])

    def requeue(self, job_id: str) -> bool:
        return self.runner.run(["scontrol", "requeue", job_id], check=False).returncode == 0

    def fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as {key: value}; {} when Slurm does not answer or know the job."""
        try:
            r = self.runner.run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=30)
        except CommandError:
            return {}
        return parse_scontrol(r.stdout) if r.returncode == 0 else {}

    def hostnames(self, nodelist: str) -> list[str]:
        try:
            r = self.runner.run(["scontrol", "show", "hostnames", nodelist], check=False, timeout=30)
        except CommandError:
            return []
        return r.stdout.split() if r.returncode == 0 else []

    def time_left(self, job_id: str) -> str | None:
        """The job's remaining time in Slurm's format (`squeue %L`); None when unlimited or unknown."""
        try:
            r = self.runner.run(["squeue", "-h", "-j", job_id, "-o", "%L"], check=False, timeout=30)
        except CommandError:
            return None
        text = r.stdout.strip()
        return text if r.returncode == 0 and SLURM_TIME.match(text) else None

    def states(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        """{job id: (Slurm state, reason)} of this user's jobs that Slurm still lists (finished ones
        linger a few minutes, then are gone): one squeue for them all. None when Slurm did not answer."""
        if not job_ids:
            return {}
        try:
            r = self.runner.run(
                ["squeue", "-h", "-u", self.user(), "-t", "all", "-o", "%i|%T|%r"], check=False, timeout=30
            )
        except CommandError:
            return None
        if r.returncode != 0:
            return None
        out = {}
        for line in r.stdout.splitlines():
            job, _, rest = line.strip().partition("|")
            state, _, reason = rest.partition("|")
            out[job] = (state, reason)
        return {j: out[j] for j in job_ids if j in out}
