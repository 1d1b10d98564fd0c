"""Member jobs: one-node, worker-only Slurm jobs whose Ray joins a running cluster's head.

The one implementation of the member-job protocol, used by every caller:

    raybridge scale --add/--remove   (submission.add_members, Members.remove; the user's side)
    lost-node replacement            (agent/replace.py, on the head)
    Ray's autoscaler                 (autoscaler/provider.py, in the head's monitor)

    script    the member script `up`/`run` left in the job folder, if it passes the trust rule
    submit    sbatch a member script with the cluster's remaining time; its MemberRecord goes to
              <job>/members/<member job>.json (a job nobody could know of is cancelled again)
    release   the record marks it released; a member whose Ray joined gets the release flag
              (<job>/members/<member job>.release: its agent gives Ray's drain notice and leaves) and
              its job is cancelled once it ended or RELEASE_WAIT_S passed; one that never joined is
              cancelled at once
    records   the cluster's member records (a record whose id is not its file's name is ignored)

Works over any Runner: a LocalRunner inside the allocation, the CLI's own (local or SSH) outside.
Imports no yaml, paramiko or typer: code in the allocation uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass

from raybridge import jobdir as jd
from raybridge import trust
from raybridge.errors import ClusterError, RaybridgeError
from raybridge.slurm import JobInfo, SlurmClient
from raybridge.transport.runner import Runner

RELEASE_WAIT_S = 30.0  # a released member's agent drains and leaves; then its job is cancelled anyway
POLL_S = 0.5


@dataclass(frozen=True)
class Member:
    record: jd.MemberRecord
    job: JobInfo | None  # None: Slurm has forgotten it

    @property
    def state(self) -> str:
        return self.job.slurm_state if self.job else "GONE"

    @property
    def active(self) -> bool:
        return self.job is not None and not self.job.finished


class Members:
    """The member jobs of one cluster, through its job folder."""

    def __init__(self, runner: Runner, folder: jd.JobDir, cluster_job: str, slurm: SlurmClient | None = None):
        self.runner = runner
        self.dir = folder
        self.cluster_job = cluster_job
        self.slurm = slurm or SlurmClient(runner)

    # ------------------------------------------------------------ what there is

    def records(self) -> list[jd.MemberRecord]:
        """The cluster's member records, oldest first. Unreadable ones, another cluster's, and one
        whose job id is not its file's name are left out."""
        out = []
        for name in self.runner.listdir(self.dir.members):
            job_id = name[:-5]
            if not name.endswith(".json") or not job_id.isdigit():
                continue
            with contextlib.suppress(jd.RecordError):
                rec = jd.parse(self.runner.read_text(self.dir.member(job_id)), jd.MemberRecord, name)
                if rec and rec.job_id == job_id and rec.cluster_job == self.cluster_job:
                    out.append(rec)
        return sorted(out, key=lambda r: (r.submitted_at or 0, int(r.job_id)))

    def listing(self) -> list[Member]:
        """Every member with Slurm's view of its job."""
        return [Member(r, self.slurm.job(r.job_id)) for r in self.records()]

    def node(self, job_id: str) -> jd.NodeRecord | None:
        """The node record of this member's Ray, once it joined."""
        for name in self.runner.listdir(self.dir.nodes):
            if name.startswith(f"m{job_id}-") and name.endswith(".json"):
                with contextlib.suppress(jd.RecordError):
                    rec = jd.parse(self.runner.read_text(self.dir.join(jd.NODES, name)), jd.NodeRecord, name)
                    if rec and rec.member_job == job_id:
                        return rec
        return None

    def ever_joined(self, job_id: str) -> bool:
        """Did this member's Ray join this cluster at any head generation (a new head keeps the previous
        generation's node records in nodes-gen<N>/ while the members rejoin it)?"""
        folders = [
            n for n in self.runner.listdir(self.dir.path) if n == jd.NODES or n.startswith("nodes-gen")
        ]
        prefix = f"m{job_id}-"
        return any(
            name.startswith(prefix) and name.endswith(".json")
            for folder in folders
            for name in self.runner.listdir(self.dir.join(folder))
        )

    def released(self) -> set[str]:
        """Members given the release flag: their nodes left on purpose, they did not die."""
        return {
            n[: -len(".release")] for n in self.runner.listdir(self.dir.members) if n.endswith(".release")
        }

    # ------------------------------------------------------------ changes

    def submit(
        self,
        script: str,
        output: str,
        *,
        copy: str | None = None,
        time_limit: str | None = None,
        tags: dict[str, str] | None = None,
        partition: str | None = None,
        gpus_per_node: int | None = None,
        labels: tuple[str, ...] = (),
    ) -> jd.MemberRecord:
        """sbatch one member script (its text: sbatch gets those bytes) with the cluster's remaining time
        (else time_limit) and record it; `copy`: where a copy of it was kept for people to read.
        SlurmError with Slurm's words when it refuses."""
        left = self.slurm.time_left(self.cluster_job) or time_limit
        sub = self.slurm.submit_text(script, output, left)
        rec = jd.MemberRecord(
            job_id=sub.job_id,
            cluster_job=self.cluster_job,
            partition=partition,
            gpus_per_node=gpus_per_node,
            labels=tuple(labels),
            submitted_at=sub.submitted_at,
            script=copy,
            tags=dict(tags) if tags is not None else None,
        )
        try:
            self.write(rec)
        except OSError as e:  # a job nobody would know of: not left behind
            self.slurm.cancel(sub.job_id)
            raise ClusterError(f"cannot record member job {sub.job_id} ({e}); cancelled it") from None
        return rec

    def script(self) -> str:
        """The cluster's member script from its job folder, if it passes the trust rule (the head runs
        it as the user, with the cluster's token): ClusterError in one line if there is none or it does
        not."""
        try:
            return trust.read_private(self.dir.member_script)
        except trust.TrustError as e:
            if not self.runner.listdir(self.dir.path) or "does not exist" in str(e):
                raise ClusterError(
                    f"no member script {self.dir.member_script}: adding or replacing nodes needs a cluster "
                    "started by `raybridge up` or `run` (they write it), not a plain sbatch of the script"
                ) from None
            raise ClusterError(f"member script refused: {e}") from None

    def write(self, rec: jd.MemberRecord) -> None:
        self.runner.makedirs(self.dir.members)
        self.runner.write_text(self.dir.member(rec.job_id), jd.to_text(rec))

    def release(self, rec: jd.MemberRecord, wait: bool = True, where: str | None = None) -> str:
        """Release one member (module docstring); what happened, in words (`where`: its node as Slurm
        names it). wait=False: the cancel after the drain happens in a background thread (the
        autoscaler must not block)."""
        if rec.released_at is None:
            self.write(dataclasses.replace(rec, released_at=jd.now()))
        node = self.node(rec.job_id)
        if node is None:
            self._cancel(rec.job_id)
            return "cancelled before its Ray joined"
        self.runner.write_text(self.dir.release(rec.job_id), "", mode=0o600)
        if not wait:
            threading.Thread(target=self.cancel_when_ended, args=(rec.job_id,), daemon=True).start()
            return "drain notice given"
        self.cancel_when_ended(rec.job_id)
        return f"drained and released {where or node.hostname or node.ip}"

    def cancel_when_ended(self, job_id: str, bound: float | None = None) -> None:
        """Wait until the job ended on its own (its agent drained and left), up to `bound` seconds
        (RELEASE_WAIT_S), then cancel it if it still runs."""
        deadline = time.monotonic() + (RELEASE_WAIT_S if bound is None else bound)
        while time.monotonic() < deadline:
            if self._ended(job_id):
                return
            time.sleep(POLL_S)
        if not self._ended(job_id):
            self._cancel(job_id)

    def remove(self, count: int) -> list[tuple[str, str]]:
        """Release the `count` newest active members (never the cluster's own allocation), one after
        the other. Returns (job id, what happened)."""
        if not 1 <= count <= 1000:
            raise ClusterError(f"--remove must be between 1 and 1000, got {count}")
        active = [m for m in self.listing() if m.active]
        if not active:
            raise ClusterError(
                f"job {self.cluster_job} has no member jobs to remove (raybridge scale --add adds them)"
            )
        return [
            (m.record.job_id, self.release(m.record, where=m.job.nodelist if m.job else None))
            for m in reversed(active[-count:])
        ]

    def cancel_all(self) -> list[str]:
        """Every member job still in the queue, cancelled (`down`: the cluster's stop flag reaches their
        agents too; this makes sure)."""
        gone = []
        for m in self.listing():
            if m.active:
                self._cancel(m.record.job_id)
                gone.append(m.record.job_id)
        return gone

    def _ended(self, job_id: str) -> bool:
        with contextlib.suppress(RaybridgeError):
            job = self.slurm.job(job_id)
            return job is None or job.finished
        return False

    def _cancel(self, job_id: str) -> None:
        with contextlib.suppress(RaybridgeError):  # already gone: nothing to cancel
            self.slurm.cancel(job_id)
