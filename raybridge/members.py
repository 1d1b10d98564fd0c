"""Growing and shrinking a running cluster with member jobs (`raybridge scale`).

A member job is a one-node, worker-only Slurm job (its own script, slurm/raybridge-member.sbatch.in)
whose agent joins the cluster's head through the cluster's job folder: same environment, token,
interface policy; its own port block. One node per job, so that each node is queued, released and
replaced on its own. Nodes carry Ray labels (raybridge.io/partition, raybridge.io/job, ...) so that work
can target a worker group.

    add(cluster, spec, count)   submit `count` member jobs; records in <job>/members/
    remove(cluster, count)      the newest first: Ray's drain notice, then the job is cancelled
    listing(cluster)            every member with Slurm's state and reason
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import time
from dataclasses import dataclass

from raybridge import jobdir as jd
from raybridge.cluster import Cluster, complete
from raybridge.errors import ClusterError
from raybridge.profile import ClusterSpec
from raybridge.render import render_member
from raybridge.runner import Runner
from raybridge.settings import SUBMITTED_AT_VAR
from raybridge.slurm import JobInfo, SlurmClient

RELEASE_WAIT_S = 30.0  # a released member's agent drains and leaves; then the job is cancelled anyway
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){1,2}$")


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


def time_left(slurm: SlurmClient, job_id: str) -> str | None:
    """The cluster job's remaining time in Slurm's format (`squeue %L`), None when unlimited."""
    r = slurm.runner.run(["squeue", "-h", "-j", job_id, "-o", "%L"], check=False)
    text = r.stdout.strip()
    return text if SLURM_TIME.match(text) else None


def records(cluster: Cluster) -> list[jd.MemberRecord]:
    out = []
    for name in cluster.runner.listdir(cluster.dir.members):
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        rec = jd.parse(cluster.runner.read_text(cluster.dir.member(name[:-5])), jd.MemberRecord, name)
        if rec and rec.cluster_job == cluster.job_id:
            out.append(rec)
    return sorted(out, key=lambda r: (r.submitted_at or 0, int(r.job_id)))


def listing(cluster: Cluster) -> list[Member]:
    return [Member(r, cluster.slurm.job(r.job_id)) for r in records(cluster)]


def member_spec(spec: ClusterSpec, cluster_job: str, time: str | None) -> ClusterSpec:
    """One worker node that joins cluster_job, labelled with its worker group."""
    labels = (
        *spec.labels,
        f"raybridge.io/partition={spec.partition or 'default'}",
        f"raybridge.io/cluster={cluster_job}",
    )
    if spec.gpus_per_node:
        labels += (f"raybridge.io/gpus={spec.gpus_per_node}",)
    return dataclasses.replace(
        spec,
        nodes=1,
        spare_nodes=0,
        replace_lost=0,
        min_nodes=None,
        max_nodes=None,
        member_of=cluster_job,
        labels=labels,
        time=time,
    )


def write_replacement_script(spec: ClusterSpec, runner: Runner, cluster_job: str) -> str:
    """The member script the head submits for a node that died (`--replace-lost`); it gets the
    cluster's remaining time on sbatch's command line."""
    from raybridge.agent.replace import script_path

    path = script_path(spec.shared_dir, cluster_job)
    runner.write_text(path, render_member(member_spec(spec, cluster_job, None)), mode=0o700)
    return path


def add(cluster: Cluster, spec: ClusterSpec, count: int) -> list[str]:
    """Submit `count` one-node member jobs that join the cluster; returns their job ids. The cluster
    must be running (its head up); the jobs get the cluster's remaining time."""
    if not 1 <= count <= 1000:
        raise ClusterError(f"--add must be between 1 and 1000, got {count}")
    job = cluster.job()
    info = cluster.info()
    if job is None or job.state != "running" or info is None or info.head is None:
        raise ClusterError(f"job {cluster.job_id} has no running Ray cluster to add nodes to")
    runner = cluster.runner
    spec = complete(spec.with_home(runner.home()), local=not runner.host)
    left = time_left(cluster.slurm, cluster.job_id)
    spec = member_spec(spec, cluster.job_id, left or spec.time)
    labels = spec.labels
    script = render_member(spec)
    scripts_dir = posixpath.join(spec.shared_dir, "scripts")
    runner.makedirs(scripts_dir)
    runner.makedirs(cluster.dir.members)
    ids = []
    for _ in range(count):
        path = posixpath.join(scripts_dir, f"{spec.job_name}-member-{time.time_ns()}.sbatch")
        runner.write_text(path, script, mode=0o700)
        submitted_at = round(time.time(), 3)
        job_id = cluster.slurm.submit(
            path,
            [f"--output={spec.logs_dir}/%x-%j.out"],
            env={SUBMITTED_AT_VAR: f"{submitted_at:.3f}"},
        )
        record = jd.MemberRecord(
            job_id=job_id,
            cluster_job=cluster.job_id,
            partition=spec.partition,
            gpus_per_node=spec.gpus_per_node,
            labels=labels,
            submitted_at=submitted_at,
            script=path,
        )
        runner.write_text(cluster.dir.member(job_id), jd.to_text(record))
        ids.append(job_id)
    return ids


def remove(cluster: Cluster, count: int, on_progress: object = None) -> list[tuple[str, str]]:
    """Release the `count` newest active members (never the cluster's own allocation): a pending one
    is cancelled at once; a running one gets Ray's drain notice through its agent, leaves, and its job
    is cancelled. Returns (job id, what happened)."""
    if not 1 <= count <= 1000:
        raise ClusterError(f"--remove must be between 1 and 1000, got {count}")
    active = [m for m in listing(cluster) if m.active]
    if not active:
        raise ClusterError(
            f"job {cluster.job_id} has no member jobs to remove (raybridge scale --add adds them)"
        )
    chosen = list(reversed(active))[:count]
    out = []
    for m in chosen:
        job_id = m.record.job_id
        if m.job and m.job.state == "pending":
            cluster.slurm.cancel(job_id)
            out.append((job_id, "cancelled while pending"))
            continue
        cluster.runner.write_text(cluster.dir.release(job_id), "", mode=0o600)
        deadline = time.monotonic() + RELEASE_WAIT_S
        while time.monotonic() < deadline:
            info = cluster.slurm.job(job_id)
            if info is None or info.finished:
                break
            time.sleep(0.5)
        else:
            cluster.slurm.cancel(job_id)
        if (info := cluster.slurm.job(job_id)) and not info.finished:
            cluster.slurm.cancel(job_id)
        node = m.job.nodelist if m.job else "?"
        out.append((job_id, f"drained and released {node}"))
    return out


def cancel_all(cluster: Cluster) -> list[str]:
    """Every member job still in the queue, cancelled (`down`: the cluster's stop flag reaches their
    agents too; this makes sure)."""
    gone = []
    for m in listing(cluster):
        if m.active:
            cluster.slurm.cancel(m.record.job_id)
            gone.append(m.record.job_id)
    return gone
