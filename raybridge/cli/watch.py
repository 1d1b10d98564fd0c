"""`status JOB --watch`: a live, compact view of one cluster, refreshed in place (rich).

Each refresh asks Slurm once, reads the cluster record, scrapes every alive node's Ray metrics and
asks the head's Jobs API for its jobs; the run's newest checkpoint is looked up less often (a
listing on shared storage).
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from raybridge import metrics as rbm
from raybridge.client import checkpoints as ck
from raybridge.client import cluster as lib
from raybridge.client.profile import ClusterSpec

CHECKPOINT_EVERY = 10.0


@dataclass
class Snapshot:
    job_id: str
    slurm: str = "?"
    reason: str = ""
    ray_state: str = "unknown"
    alive: int = 0
    expected: int = 0
    generation: int = 0
    nodes: list[dict[str, Any]] = field(default_factory=list)
    ray_jobs: list[dict[str, Any]] | str = field(default_factory=list)
    checkpoint: str = "none yet"
    finished: bool = False
    at: float = 0.0


class Watcher:
    def __init__(self, cluster: lib.Cluster, spec: ClusterSpec):
        self.c = cluster
        self.shared = spec.with_home(cluster.runner.home()).shared_dir
        self.checkpoint = "none yet"
        self.checkpoint_at = -1e9

    def snapshot(self) -> Snapshot:
        c = self.c
        job = c.job()
        info = c.info()
        s = Snapshot(job_id=c.job_id, at=time.time())
        if job:
            s.slurm, s.reason, s.finished = job.slurm_state, job.reason, job.finished
        else:
            s.slurm, s.finished = "GONE", True
        if info is None:
            return s
        s.ray_state, s.alive, s.expected, s.generation = (
            info.state,
            info.alive_nodes,
            info.expected_nodes,
            info.generation,
        )
        scraped = {m.node: m for m in rbm.scrape(c.runner, info)} if not s.finished else {}
        released = c.members.released() if any(not n.alive and n.member_job for n in info.nodes) else set()
        for n in info.nodes:
            m = scraped.get(n.hostname or n.ip)
            left = not n.alive and n.member_job in released
            s.nodes.append(
                {"node": n.hostname or n.ip, "ip": n.ip, "alive": bool(n.alive), "left": left, "metrics": m}
            )
        s.ray_jobs = self.ray_jobs(info) if info.state == "ready" and not s.finished else []
        if time.monotonic() - self.checkpoint_at > CHECKPOINT_EVERY:
            self.checkpoint_at = time.monotonic()
            self.checkpoint = self.newest_checkpoint(info.job_name or "raybridge")
        s.checkpoint = self.checkpoint
        return s

    def ray_jobs(self, info: Any) -> list[dict[str, Any]] | str:
        """The head's Jobs API (with the cluster's token): newest first."""
        if not info.head or "dashboard" not in info.ports:
            return []
        headers = {}
        if info.auth == "token":
            token = (self.c.runner.read_text(self.c.dir.token) or "").strip()
            headers["Authorization"] = f"Bearer {token}"
        try:
            body = rbm.http_get(self.c.runner, info.head.ip, info.ports["dashboard"], "/api/jobs/", headers)
            jobs = json.loads(body)
        except (OSError, ValueError) as e:
            return f"Jobs API: {str(e)[:80]}"
        jobs = [j for j in jobs if isinstance(j, dict)]
        return sorted(jobs, key=lambda j: j.get("start_time") or 0, reverse=True)[:5]

    def newest_checkpoint(self, job_name: str) -> str:
        run = posixpath.join(ck.runs_dir(self.shared), f"{job_name}-{self.c.job_id}")
        newest = ck.newest_complete(self.c.runner, run)
        if newest is None:
            return "none yet"
        cp, step = newest
        age = time.time() - cp.mtime
        return f"{cp.name} (step {step}, {age:.0f}s ago) in {run}"


def pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0f}%"


def view(s: Snapshot) -> Group:
    title = Text.assemble(
        (f"job {s.job_id}", "bold"),
        f"  Slurm {s.slurm}" + (f" ({s.reason})" if s.reason and s.reason != "None" else ""),
        f"  Ray {s.ray_state}  {s.alive}/{s.expected} nodes alive",
        f"  head generation {s.generation}" if s.generation else "",
        f"  {time.strftime('%H:%M:%S', time.localtime(s.at))}",
    )
    nodes = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("node", "state", "cpu", "memory GiB", "gpu", "object store GiB", "tasks"):
        nodes.add_column(col, justify="left" if col in ("node", "state") else "right")
    for n in s.nodes:
        m = n["metrics"]
        if n.get("left"):
            nodes.add_row(n["node"], Text("left", style="dim"), "", "", "", "", "")
        elif not n["alive"]:
            nodes.add_row(n["node"], Text("DEAD", style="red"), "", "", "", "", "")
        elif m is None or m.error:
            nodes.add_row(n["node"], "alive", "?", "?", "?", "?", "?")
        else:
            nodes.add_row(
                n["node"],
                Text("alive", style="green"),
                pct(m.cpu_percent),
                f"{rbm.gib(m.mem_used)}/{rbm.gib(m.mem_total)}",
                pct(m.gpu_percent) if m.gpus else "-",
                f"{rbm.gib(m.object_store_used)}/{rbm.gib(m.object_store_total)}",
                f"{m.tasks_running or 0:.0f}",
            )
    if isinstance(s.ray_jobs, str):
        jobs: Any = Text(s.ray_jobs)
    elif not s.ray_jobs:
        jobs = Text("Ray jobs: none")
    else:
        jobs = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("Ray job", "status", "entrypoint"):
            jobs.add_column(col)
        for j in s.ray_jobs:
            jobs.add_row(
                str(j.get("submission_id") or j.get("job_id") or "?"),
                str(j.get("status", "?")),
                str(j.get("entrypoint", ""))[:60],
            )
    return Group(title, nodes, jobs, Text(f"last checkpoint: {s.checkpoint}"))


def watch(cluster: lib.Cluster, spec: ClusterSpec, interval: float = 2.0) -> Snapshot:
    """Refresh until the job ends or Ctrl-C; returns the last snapshot."""
    w = Watcher(cluster, spec)
    s = w.snapshot()
    with Live(view(s), console=Console(), auto_refresh=False, transient=False) as live:
        try:
            while not s.finished:
                time.sleep(interval)
                s = w.snapshot()
                live.update(view(s), refresh=True)
        except KeyboardInterrupt:
            pass
    return s
