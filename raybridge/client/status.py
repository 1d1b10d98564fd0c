"""Slurm's and Ray's view of one cluster as one typed record (`raybridge status`, `up --json`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from raybridge import jobdir as jd
from raybridge.autoscaler import config as autoscale
from raybridge.client import timeline
from raybridge.client.cluster import Cluster


@dataclass(frozen=True)
class NodeStatus:
    record: jd.NodeRecord
    left: bool  # released on purpose (scale --remove, the autoscaler): it left, it did not die

    def to_dict(self) -> dict[str, Any]:
        data = self.record.to_dict()
        data.pop("schema", None)
        return {**data, "left": self.left}


@dataclass(frozen=True)
class MemberStatus:
    job_id: str
    slurm_state: str
    reason: str | None
    node: str | None  # where it runs
    partition: str | None
    autoscaled: bool
    released_at: float | None
    labels: tuple[str, ...]
    submitted_at: float | None


@dataclass(frozen=True)
class ClusterStatus:
    job_id: str
    name: str | None
    slurm_state: str  # GONE once Slurm forgot the job
    state: str  # Slurm's state, coarse (slurm.STATES), or gone
    reason: str | None
    nodelist: str | None
    ray_state: str  # the cluster record's: starting | ready | recovering | failed | stopped | unknown
    expected_nodes: int | None
    alive_nodes: int
    nodes: tuple[NodeStatus, ...]
    address: str | None
    dashboard_url: str | None
    auth: str | None
    token_path: str | None
    job_dir: str
    log: str | None
    timestamps: dict[str, float]
    generation: int
    events: tuple[dict[str, Any], ...]  # the head's and those written elsewhere, in time order
    timeline: tuple[dict[str, Any], ...]
    accounting: dict[str, Any] | None
    members: tuple[MemberStatus, ...]
    autoscale: dict[str, int] | None

    def nodes_line(self) -> str:
        """`2/2 nodes alive, 2 member nodes, 1 lost`: the allocation's nodes against what it asked for,
        then what member jobs brought, then nodes that died (released ones left: not lost)."""
        own = sum(1 for n in self.nodes if n.record.alive and not n.record.member_job)
        members = sum(1 for n in self.nodes if n.record.alive and n.record.member_job)
        lost = sum(1 for n in self.nodes if not n.record.alive and not n.left)
        text = f"{own}/{self.expected_nodes or '?'} nodes alive"
        text += f", {members} member node{'s' if members != 1 else ''}" if members else ""
        return text + (f", {lost} lost" if lost else "")

    def to_dict(self) -> dict[str, Any]:
        """As `status --json` prints it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["nodes"] = [n.to_dict() for n in self.nodes]
        data["members"] = [dataclasses.asdict(m) | {"labels": list(m.labels)} for m in self.members]
        data["events"], data["timeline"] = list(self.events), list(self.timeline)
        return data


def of(cluster: Cluster) -> ClusterStatus:
    """Ask Slurm and read the job folder once."""
    job = cluster.job()
    info = cluster.info()
    members = cluster.members
    released = members.released()
    side = timeline.side_events(cluster.runner, cluster.dir)
    head_events = [e for e in map(timeline.clean, info.events if info else ()) if e is not None]
    acct = cluster.accounting(settle=0)
    return ClusterStatus(
        job_id=cluster.job_id,
        name=job.name if job else (info.job_name if info else None),
        slurm_state=job.slurm_state if job else "GONE",
        state=job.state if job else "gone",
        reason=job.reason if job else None,
        nodelist=job.nodelist if job else None,
        ray_state=info.state if info else "unknown",
        expected_nodes=info.expected_nodes if info else None,
        alive_nodes=info.alive_nodes if info else 0,
        nodes=tuple(
            NodeStatus(n, left=not n.alive and n.member_job in released) for n in (info.nodes if info else ())
        ),
        address=info.address if info else None,
        dashboard_url=info.dashboard_url if info else None,
        auth=info.auth if info else None,
        token_path=info.token_path if info else None,
        job_dir=cluster.job_dir,
        log=job.stdout if job else None,
        timestamps=info.timestamps if info else {},
        generation=info.generation if info else 0,
        events=tuple(sorted([*head_events, *side], key=lambda e: e["at"])),
        timeline=tuple(timeline.build(info, side)),
        accounting=acct.as_dict() if acct else None,
        members=tuple(
            MemberStatus(
                job_id=m.record.job_id,
                slurm_state=m.state,
                reason=m.job.reason if m.job else None,
                node=m.job.nodelist if m.job and m.job.state == "running" else None,
                partition=m.record.partition,
                autoscaled=m.record.tags is not None,
                released_at=m.record.released_at,
                labels=tuple(m.record.labels),
                submitted_at=m.record.submitted_at,
            )
            for m in members.listing()
        ),
        autoscale=autoscale.limits(cluster.runner.read_text(autoscale.config_path(cluster.job_dir))),
    )
