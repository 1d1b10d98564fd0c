"""The head's question to Slurm about its own job: was the batch host removed from it?"""

from __future__ import annotations

import os

from raybridge.slurm import SlurmClient


def batch_host_lost(slurm: SlurmClient, job_id: str) -> tuple[str, bool] | None:
    """(batch host, may be requeued) when Slurm removed the batch host from the job, else None.
    One RPC while the node list is the one the job started with (SLURM_JOB_NODELIST)."""
    fields = slurm.fields(job_id)
    host, nodelist = fields.get("BatchHost", ""), fields.get("NodeList", "")
    if not host or not nodelist or nodelist == os.environ.get("SLURM_JOB_NODELIST"):
        return None
    if host in slurm.hostnames(nodelist):
        return None
    return host, fields.get("Requeue") == "1"
