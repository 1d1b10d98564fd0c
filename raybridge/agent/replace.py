"""`--replace-lost K`: the head submits a member job for a node that died, at most K times.

The member script was rendered by `raybridge up`/`run` right after submission (members.member_script):
<shared_dir>/scripts/member-of-<job>.sbatch. The replacement gets the cluster's remaining time. A loss
beyond the bound, or a replacement Slurm refused, is an event (`not_replaced`) that `status` shows.
"""

from __future__ import annotations

import os
import posixpath

from raybridge import jobdir as jd
from raybridge.agent import slurmjob
from raybridge.agent.rendezvous import Rendezvous
from raybridge.settings import AgentSettings


def script_path(shared_dir: str, job_id: str) -> str:
    return posixpath.join(shared_dir.rstrip("/"), "scripts", f"member-of-{job_id}.sbatch")


class Replacer:
    def __init__(self, settings: AgentSettings, rendezvous: Rendezvous):
        self.settings = settings
        self.rendezvous = rendezvous

    def on_dead(self, node: jd.NodeRecord) -> str | None:
        """Submit a replacement for this dead node if the bound allows; the new job's id."""
        limit = self.settings.replace_lost
        if limit <= 0:
            return None
        host = node.hostname or node.ip
        if node.member_job and os.path.exists(self.rendezvous.dir.release(node.member_job)):
            return None  # released on purpose (`raybridge scale --remove`)
        rec = self.rendezvous.cluster()
        used = sum(1 for e in (rec.events if rec else ()) if e.get("event") == "replacement_submitted")
        if used >= limit:
            self.rendezvous.log_event("not_replaced", host, f"--replace-lost {limit}: all {limit} used")
            return None
        script = script_path(self.settings.shared_dir, self.settings.job_id)
        if not os.path.exists(script):
            self.rendezvous.log_event(
                "not_replaced", host, f"no member script {script} (not submitted by raybridge)"
            )
            return None
        output = posixpath.join(self.settings.shared_dir.rstrip("/"), "logs", "%x-%j.out")
        try:
            job = slurmjob.submit(script, output, slurmjob.time_left(self.settings.job_id))
        except RuntimeError as e:
            self.rendezvous.log_event("not_replaced", host, str(e))
            return None
        os.makedirs(self.rendezvous.dir.members, mode=0o700, exist_ok=True)
        jd.write(
            self.rendezvous.dir.member(job),
            jd.MemberRecord(
                job_id=job, cluster_job=self.settings.job_id, submitted_at=jd.now(), script=script
            ),
        )
        self.rendezvous.log_event("replacement_submitted", host, f"member job {job} ({used + 1} of {limit})")
        return job
