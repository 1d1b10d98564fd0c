"""The shared folder's layout: every path under `shared_dir`, named once.

<shared_dir>/                  (the profile's shared_dir, on storage every node and the login node see)
    scripts/                   a copy of each submitted batch script (sbatch gets the bytes themselves)
    logs/%x-%j.out             Slurm's output of every job
    jobs/<job id>/             the job folder (jobdir.JobDir: records, flags, kept logs)
    runs/<run name>/           Ray Train's storage (raybridge.train): checkpoints
    prometheus/<job id>.json   Prometheus file_sd targets of a running cluster
    doctor/<stamp>/            the doctor job's reports

POSIX strings throughout: the folder may be on the far side of SSH. Imports nothing of raybridge's, so
code in the allocation and on the user's side share it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

SCRIPTS = "scripts"
LOGS = "logs"
JOBS = "jobs"
RUNS = "runs"
PROMETHEUS = "prometheus"
DOCTOR = "doctor"
OUTPUT_PATTERN = "%x-%j.out"  # sbatch's --output: <job name>-<job id>.out
# In runs/<run>/checkpoint_*/: written last by raybridge.train; a checkpoint without it is incomplete.
CHECKPOINT_MARKER = "raybridge-checkpoint.json"


@dataclass(frozen=True)
class SharedDir:
    """Named paths under one shared folder (its leading ~ already resolved)."""

    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", self.path.rstrip("/") or "/")

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    @property
    def scripts(self) -> str:
        return self.join(SCRIPTS)

    def script(self, name: str) -> str:
        return self.join(SCRIPTS, f"{name}.sbatch")

    @property
    def logs(self) -> str:
        return self.join(LOGS)

    @property
    def output(self) -> str:
        """sbatch's --output for every job raybridge submits."""
        return self.join(LOGS, OUTPUT_PATTERN)

    @property
    def jobs(self) -> str:
        return self.join(JOBS)

    def job(self, job_id: str) -> str:
        """A job's folder (jobdir.JobDir(path) names what is inside)."""
        return self.join(JOBS, job_id)

    @property
    def runs(self) -> str:
        return self.join(RUNS)

    @property
    def prometheus(self) -> str:
        return self.join(PROMETHEUS)

    def sd_file(self, job_id: str) -> str:
        return self.join(PROMETHEUS, f"{job_id}.json")

    @property
    def doctor(self) -> str:
        return self.join(DOCTOR)

    @classmethod
    def of_script(cls, script: str) -> SharedDir:
        """The shared folder a submitted script (<shared>/scripts/<name>.sbatch) lives in."""
        return cls(posixpath.dirname(posixpath.dirname(script)))

    @classmethod
    def of_job_dir(cls, job_dir: str) -> SharedDir:
        """The shared folder a job folder (<shared>/jobs/<id>) lives in."""
        return cls(posixpath.dirname(posixpath.dirname(job_dir.rstrip("/"))))
