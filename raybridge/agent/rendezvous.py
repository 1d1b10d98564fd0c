"""The agents' side of the job folder: prepare it, publish the head, record nodes, keep cluster.json.

Every file goes through raybridge.jobdir (named paths, typed records, atomic writes); this module
only decides what the agents write and when.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from raybridge import jobdir as jd
from raybridge.settings import AgentSettings
from raybridge.trust import TrustError

log = logging.getLogger(__name__)


class Rendezvous:
    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.dir = jd.JobDir(settings.job_dir)
        self._update_lock = threading.RLock()

    # ------------------------------------------------------------ the batch step, once

    def prepare(self, job_name: str = "", submitted_at: str | None = None, restart_count: int = 0) -> None:
        """Job folder (0700), a fresh token (0600), and the first cluster record."""
        folder = Path(self.dir.path)
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        # A requeued job keeps its id and folder: drop the previous start's rendezvous state.
        for stale in (
            self.dir.head,
            self.dir.stop,
            self.dir.token,
            self.dir.preempt,
            self.dir.driver_restart,
        ):
            Path(stale).unlink(missing_ok=True)
        shutil.rmtree(self.dir.nodes, ignore_errors=True)
        shutil.rmtree(self.dir.join("generations"), ignore_errors=True)
        for old in Path(self.dir.path).glob("nodes-gen*"):
            shutil.rmtree(old, ignore_errors=True)
        Path(self.dir.nodes).mkdir()
        Path(self.dir.logs).mkdir(exist_ok=True)
        Path(self.dir.events).mkdir(exist_ok=True)
        history = self.history(restart_count)
        if self.settings.auth:
            # Created 0600 from the start: the token is never readable by others, even briefly.
            fd = os.open(self.dir.token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        jd.write(
            self.dir.cluster,
            jd.ClusterRecord(
                job_id=self.settings.job_id,
                job_name=job_name,
                state="starting",
                expected_nodes=self.settings.nodes,
                auth="token" if self.settings.auth else "none",
                token_path=self.dir.token if self.settings.auth else None,
                job_dir=self.dir.path,
                submitted_at=float(submitted_at) if submitted_at else None,
                started_at=jd.now(),
                restart_count=restart_count,
                events=history,
            ),
        )

    # ------------------------------------------------------------ head and nodes

    def publish_head(self, head: jd.HeadRecord) -> None:
        jd.write(self.dir.head, head)

    def head(self) -> jd.HeadRecord | None:
        return jd.read(self.dir.head, jd.HeadRecord)

    def wait_for_head(self, stop_requested: Any, generation: int = 0) -> jd.HeadRecord | None:
        """The head's record (of this generation or a later one) once published; None if the job is
        stopped first."""
        deadline = time.monotonic() + self.settings.ready_timeout
        while (head := self.head()) is None or head.generation < generation:
            if stop_requested():
                return None
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the head did not publish {self.dir.head} within {self.settings.ready_timeout}s"
                )
            time.sleep(0.1)
        return head

    def write_node(self, node: jd.NodeRecord) -> None:
        Path(self.dir.nodes).mkdir(exist_ok=True)
        key = (
            f"m{self.settings.job_id}-{self.settings.rank}"
            if self.settings.cluster_job
            else self.settings.rank
        )
        jd.write(self.dir.node(key), node)

    def joined(self) -> int:
        return len(list(Path(self.dir.nodes).glob("*.json")))

    def node_records(self, gcs_nodes: list[dict[str, Any]]) -> tuple[jd.NodeRecord, ...]:
        """What each agent recorded, merged with the GCS's view of the node (by address)."""
        agents = {}
        for f in Path(self.dir.nodes).glob("*.json"):
            rec = jd.read(f, jd.NodeRecord)
            if rec:
                agents[rec.ip] = rec.to_dict()
        out = []
        for n in gcs_nodes:
            data = dict(agents.get(n["ip"], {}))
            data.update(n)
            data["hostname"] = data.get("hostname") or n["ray_hostname"]
            out.append(jd.NodeRecord.from_dict(data))
        big = 1 << 30
        return tuple(sorted(out, key=lambda r: (not r.alive, r.rank if r.rank is not None else big, r.ip)))

    def history(self, restart_count: int) -> tuple[dict[str, Any], ...]:
        """A requeued job starts a fresh record; what the earlier starts went through stays as events."""
        old = self.cluster() if restart_count else None
        if old is None:
            return ()
        past = [
            {"at": at, "event": key.removesuffix("_at"), "node": "", "detail": f"start {old.restart_count}"}
            for key, at in old.timestamps.items()
            if key not in ("submitted_at", "updated_at")
        ]
        requeued = {"at": jd.now(), "event": "requeued", "node": "", "detail": f"start {restart_count}"}
        return (*sorted([*old.events, *past], key=lambda e: e.get("at") or 0), requeued)

    def node_changes(
        self, before: tuple[jd.NodeRecord, ...], after: tuple[jd.NodeRecord, ...]
    ) -> list[jd.NodeRecord]:
        """Events for nodes that died or came (back) since the last look; the nodes that died."""
        was = {n.ip: n.alive for n in before}
        dead = []
        for n in after:
            if was.get(n.ip) and not n.alive:
                if n.member_job and os.path.exists(self.dir.release(n.member_job)):
                    self.log_event("node_left", n.hostname or n.ip, f"member job {n.member_job} released")
                    continue
                dead.append(n)
                self.log_event("node_dead", n.hostname or n.ip, "Ray marked the node dead", at=n.died_at)
            elif n.alive and n.ip in was and not was[n.ip]:
                self.log_event("node_alive", n.hostname or n.ip, "alive again")
        return dead

    # ------------------------------------------------------------ the cluster record

    def cluster(self) -> jd.ClusterRecord | None:
        return jd.read(self.dir.cluster, jd.ClusterRecord)

    def update_cluster(self, **changes: Any) -> None:
        """Read, change, write (only the head writes it while the job runs; the lock: its threads)."""
        with self._update_lock:
            rec = self.cluster()
            if rec is None:
                raise RuntimeError(f"{self.dir.cluster} is missing (the batch step prepares it)")
            new = rec.with_changes(**changes)
            if new != rec:
                jd.write(self.dir.cluster, new)

    def new_generation(self, generation: int, lost: jd.HeadRecord) -> None:
        """A new head takes over: what the old cluster's nodes recorded is kept aside, the loss is
        recorded, and clients see `recovering` (a batch driver stops, to start again on the new head)."""
        nodes = Path(self.dir.nodes)
        if nodes.exists():
            nodes.rename(self.dir.join(f"nodes-gen{generation - 1}"))
        nodes.mkdir()
        self.log_event("head_lost", lost.hostname, f"rank {lost.rank}, generation {lost.generation}")
        self.update_cluster(state="recovering", generation=generation, nodes_alive_at=None, ready_at=None)

    def log_event(self, event: str, node: str, detail: str = "", at: float | None = None) -> None:
        """An event on the cluster record; `at` where it happened earlier than now (never later)."""
        when = jd.now() if at is None else min(at, jd.now())
        entry = {"at": when, "event": event, "node": node, "detail": detail}
        with self._update_lock:  # read and append under the lock: the head's threads log too
            rec = self.cluster()
            if rec is not None:
                self.update_cluster(events=(*rec.events, entry))

    def publish_targets(self) -> None:
        """Prometheus service discovery for this cluster (metrics.py): the alive nodes' endpoints."""
        from raybridge import metrics

        rec = self.cluster()
        if rec is not None:
            with contextlib.suppress(OSError, TrustError):  # (a prometheus/ folder that is not ours)
                metrics.write_sd(self.settings.shared_dir, rec)

    def withdraw_targets(self) -> None:
        from raybridge import metrics

        with contextlib.suppress(OSError):
            metrics.remove_sd(self.settings.shared_dir, self.settings.job_id)

    def release_flagged(self) -> bool:
        """This member job was asked to leave (`raybridge scale --remove`)."""
        return bool(self.settings.cluster_job) and os.path.exists(self.dir.release(self.settings.job_id))

    def preempt_flagged_at(self) -> float | None:
        """When Slurm's USR1 reached the batch script (its trap touched the flag), or None."""
        try:
            return os.stat(self.dir.preempt).st_mtime
        except OSError:
            return None

    def preempt_flagged(self) -> bool:
        return self.preempt_flagged_at() is not None

    def stop_flagged(self) -> bool:
        return os.path.exists(self.dir.stop)
