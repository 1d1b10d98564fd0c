"""`--replace-lost K`: the head submits a member job for a node that died, at most K times.

The member script was rendered by `raybridge up`/`run` at submission (<job folder>/member.sbatch, read
only if it passes the trust rule); members.Members submits it with the cluster's remaining time. A loss beyond the bound, or a replacement
Slurm refused, is an event (`not_replaced`) that `status` shows.
"""

from __future__ import annotations

from raybridge import jobdir as jd
from raybridge.agent.rendezvous import Rendezvous
from raybridge.errors import RaybridgeError
from raybridge.members import Members
from raybridge.settings import AgentSettings
from raybridge.transport.runner import LocalRunner


class Replacer:
    def __init__(self, settings: AgentSettings, rendezvous: Rendezvous):
        self.settings = settings
        self.rendezvous = rendezvous
        self.members = Members(LocalRunner(), rendezvous.dir, settings.job_id)

    def on_dead(self, node: jd.NodeRecord) -> str | None:
        """Submit a replacement for this dead node if the bound allows; the new job's id."""
        limit = self.settings.replace_lost
        if limit <= 0:
            return None
        host = node.hostname or node.ip
        if node.member_job and node.member_job in self.members.released():
            return None  # released on purpose (`raybridge scale --remove`, the autoscaler)
        if self.rendezvous.preempt_flagged():
            return None  # drained at Slurm's USR1: an idle drained node's Ray leaves; the job is ending
        rec = self.rendezvous.cluster()
        used = sum(1 for e in (rec.events if rec else ()) if e.get("event") == "replacement_submitted")
        if used >= limit:
            self.rendezvous.log_event("not_replaced", host, f"--replace-lost {limit}: all {limit} used")
            return None
        layout = self.settings.layout
        try:
            member = self.members.submit(self.members.script(), layout.output)
        except RaybridgeError as e:
            self.rendezvous.log_event("not_replaced", host, str(e))
            return None
        job = member.job_id
        self.rendezvous.log_event("replacement_submitted", host, f"member job {job} ({used + 1} of {limit})")
        return job
