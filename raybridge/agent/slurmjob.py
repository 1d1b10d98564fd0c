"""The agents' few questions to Slurm about their own job (the batch host's fate), from inside it."""

from __future__ import annotations

import os
import subprocess

from raybridge.slurm import parse_scontrol


def _scontrol(*args: str) -> str:
    try:
        r = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout if r.returncode == 0 else ""


def batch_host_lost(job_id: str) -> tuple[str, bool] | None:
    """(batch host, may be requeued) when Slurm removed the batch host from the job, else None.
    One RPC while the node list is the one the job started with (SLURM_JOB_NODELIST)."""
    fields = parse_scontrol(_scontrol("show", "job", "-o", job_id))
    host, nodelist = fields.get("BatchHost", ""), fields.get("NodeList", "")
    if not host or not nodelist or nodelist == os.environ.get("SLURM_JOB_NODELIST"):
        return None
    if host in _scontrol("show", "hostnames", nodelist).split():
        return None
    return host, fields.get("Requeue") == "1"


def time_left(job_id: str) -> str | None:
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=30)
    text = r.stdout.strip()
    return text if r.returncode == 0 and text[:1].isdigit() else None


def submit(script: str, output: str, time: str | None) -> str:
    """sbatch a member script from inside the job; the new job's id. RuntimeError with Slurm's words."""
    argv = ["sbatch", "--parsable", f"--output={output}"] + ([f"--time={time}"] if time else []) + [script]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"sbatch failed: {e}") from None
    job = r.stdout.strip().split(";")[0]
    if r.returncode != 0 or not job.isdigit():
        raise RuntimeError(f"sbatch refused the replacement: {(r.stderr or r.stdout).strip()[-300:]}")
    return job


def requeue(job_id: str) -> None:
    _scontrol("requeue", job_id)


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
