"""Ray's autoscaler node provider over Slurm member jobs (config.py says how the pieces fit).

Loaded by Ray's autoscaler monitor on the head (`provider: {type: external, module:
raybridge.autoscaler.provider.SlurmNodeProvider}`); it subclasses Ray's public NodeProvider, so this module
imports Ray and nothing else of raybridge's imports it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_UNMANAGED,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from raybridge import jobdir as jd
from raybridge.autoscaler.config import HEAD_TYPE, QUEUE_CACHE_S
from raybridge.errors import RaybridgeError
from raybridge.members import Members
from raybridge.slurm import finished
from raybridge.transport.runner import LocalRunner

JUST_SUBMITTED_S = 30.0  # a member job Slurm does not list yet is taken as pending this long
FAILED_EVENT_S = 300.0  # a failed submission's event is written again after this long


class SlurmNodeProvider(NodeProvider):
    """Ray's NodeProvider over member jobs (runs in the head's autoscaler monitor)."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.dir = jd.JobDir(provider_config["job_dir"])
        self.cluster_job = str(provider_config["cluster_job"])
        self.logs = provider_config["logs"]
        self.join_timeout = float(provider_config.get("join_timeout", 600))
        self.members = Members(LocalRunner(), self.dir, self.cluster_job)
        self.lock = threading.RLock()
        self.nodes: dict[str, dict[str, Any]] = {}  # node id -> {"tags", "ip", "record"}
        self.queue_ok = True
        self.last_failure = ("", 0.0)
        self.queue: tuple[float, frozenset[str], dict[str, tuple[str, str]]] = (0.0, frozenset(), {})

    # ------------------------------------------------------------ what there is

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        with self.lock:
            self.refresh()
            return [
                node_id
                for node_id, n in self.nodes.items()
                if all(n["tags"].get(k) == v for k, v in tag_filters.items())
            ]

    def refresh(self) -> None:
        nodes: dict[str, dict[str, Any]] = {}
        cluster = jd.read(self.dir.cluster, jd.ClusterRecord)
        head_ip = cluster.head.ip if cluster and cluster.head else None
        if head_ip:
            nodes[f"{self.cluster_job}-head"] = {
                "ip": head_ip,
                "tags": {
                    TAG_RAY_NODE_KIND: NODE_KIND_HEAD,
                    TAG_RAY_USER_NODE_TYPE: HEAD_TYPE,
                    TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                },
            }
        joined: dict[str, str] = {}  # member job -> its node's IP
        for f in Path(self.dir.nodes).glob("*.json"):
            with contextlib.suppress(jd.RecordError):
                rec = jd.read(f, jd.NodeRecord)
                if rec is None or rec.ip == head_ip:
                    continue
                if rec.member_job:
                    joined[rec.member_job] = rec.ip
                else:
                    nodes[f"{self.cluster_job}-{f.stem}"] = {
                        "ip": rec.ip,
                        "tags": {TAG_RAY_NODE_KIND: NODE_KIND_UNMANAGED},
                    }
        records = self.members.records()
        states = self.queue_states([r.job_id for r in records if not r.released_at])
        self.queue_ok = states is not None
        if states is None:  # Slurm did not answer: keep the last view (safe_to_scale says wait)
            return
        for rec in records:
            # Not listed yet right after sbatch is still pending (else the autoscaler would submit again).
            young = time.time() - (rec.submitted_at or 0) < JUST_SUBMITTED_S
            state, reason = states.get(rec.job_id, ("PENDING", "") if young else ("GONE", ""))
            if rec.released_at or finished(state) or state == "GONE":
                continue
            ip = joined.get(rec.job_id)
            if rec.tags is None:  # added by hand or as a replacement: not the autoscaler's
                if ip:
                    nodes[rec.job_id] = {"ip": ip, "tags": {TAG_RAY_NODE_KIND: NODE_KIND_UNMANAGED}}
                continue
            late = time.time() - (rec.submitted_at or 0) > self.join_timeout
            if ip is None and late and not self.members.ever_joined(rec.job_id):  # (rejoining a new head)
                why = f"Slurm {state}" + (f" ({reason})" if reason and reason != "None" else "")
                self.release(rec, f"did not join within {self.join_timeout:.0f}s: {why}", "not_joined")
                continue
            tags = dict(rec.tags)
            if ip:
                tags[TAG_RAY_NODE_STATUS] = STATUS_UP_TO_DATE
            nodes[rec.job_id] = {"ip": ip, "tags": tags, "record": rec}
        self.nodes = nodes

    def queue_states(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        """Slurm's view of the member jobs; the autoscaler looks every second, Slurm is asked at most
        every QUEUE_CACHE_S unless there is a job it was not asked about (a node joining is seen in
        its record at once: that needs no Slurm)."""
        at, asked, states = self.queue
        if set(job_ids) <= asked and time.monotonic() - at < QUEUE_CACHE_S:
            return {j: states[j] for j in job_ids if j in states}
        fresh = self.members.slurm.states(job_ids)
        if fresh is not None:
            self.queue = (time.monotonic(), frozenset(job_ids), fresh)
        return fresh

    def safe_to_scale(self) -> bool:
        return self.queue_ok

    def is_running(self, node_id: str) -> bool:
        with self.lock:
            return node_id in self.nodes

    def is_terminated(self, node_id: str) -> bool:
        return not self.is_running(node_id)

    def node_tags(self, node_id: str) -> dict[str, str]:
        with self.lock:
            n = self.nodes.get(node_id)
            return dict(n["tags"]) if n else {}

    def internal_ip(self, node_id: str) -> str | None:
        with self.lock:
            n = self.nodes.get(node_id)
            return n["ip"] if n else None

    def external_ip(self, node_id: str) -> str | None:
        return self.internal_ip(node_id)

    # ------------------------------------------------------------ changes

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> dict[str, Any]:
        created = {}
        for _ in range(count):
            try:
                rec = self.members.submit(self.members.script(), self.logs, tags=tags)
            except RaybridgeError as e:
                self.failed(str(e))
                raise
            jd.add_event(self.dir, "autoscale_submitted", "", f"member job {rec.job_id} for pending demand")
            with self.lock:
                self.nodes[rec.job_id] = {"ip": None, "tags": dict(tags), "record": rec}
            created[rec.job_id] = tags
        return created

    def failed(self, why: str) -> None:
        """An event for a failed submission; the autoscaler retries every second, the event is
        written again only when the reason changes or after FAILED_EVENT_S."""
        now = time.monotonic()
        if why != self.last_failure[0] or now - self.last_failure[1] > FAILED_EVENT_S:
            self.last_failure = (why, now)
            jd.add_event(self.dir, "autoscale_failed", "", why)

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with self.lock:
            n = self.nodes.get(node_id)
            if not n or "record" not in n:
                return
            rec = n["record"]
            rec = replace(rec, tags={**(rec.tags or {}), **tags})
            self.members.write(rec)
            n["record"] = rec
            n["tags"].update(tags)

    def terminate_node(self, node_id: str) -> None:
        with self.lock:
            n = self.nodes.pop(node_id, None)
        if n and "record" in n:
            self.release(
                n["record"], "released by the autoscaler (idle or above the limits)", "autoscale_released"
            )

    def release(self, rec: jd.MemberRecord, why: str, event: str) -> None:
        """Release the member (members.Members.release); the autoscaler does not wait for it."""
        jd.add_event(self.dir, event, "", f"member job {rec.job_id}: {why}")
        self.members.release(rec, wait=False)
