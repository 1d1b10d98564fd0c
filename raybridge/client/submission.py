"""Submission: a ClusterSpec becomes one request (script, sbatch arguments, environment) that
`raybridge render` prints and `up`/`run` submit; member jobs (`raybridge scale --add`) the same way.

    request(spec, runner)     what would be submitted (render prints request.script)
    submit(spec, runner)      write the script to <shared_dir>/scripts, sbatch it; a Cluster handle
    add_members(cluster, spec, count)   one-node member jobs that join a running cluster
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from dataclasses import dataclass

from raybridge import envcheck
from raybridge.autoscaler import config as autoscale
from raybridge.client import doctor
from raybridge.client.cluster import Cluster
from raybridge.client.profile import ClusterSpec
from raybridge.client.render import render, render_member
from raybridge.errors import ClusterError
from raybridge.jobdir import ClusterRecord
from raybridge.slurm import SlurmClient
from raybridge.transport.runner import Runner


@dataclass(frozen=True)
class Request:
    """Everything sbatch gets for one cluster: what `render` prints is what `up` submits."""

    spec: ClusterSpec  # completed, ~ resolved
    script: str
    path: str  # where a copy of the script is kept (0700); sbatch reads the text itself
    output: str  # sbatch --output

    def sbatch_line(self) -> str:
        """The command that submits it (plus the submission time in the job's environment): the script's
        bytes on sbatch's standard input, and a copy at `path` for people to read."""
        return f"{shlex.join(['sbatch', f'--output={self.output}'])} < {shlex.quote(self.path)}"


def complete(spec: ClusterSpec, local: bool, runner: Runner | None = None) -> ClusterSpec:
    """What only the submitting side knows: which Python the job runs when the profile does not say
    (on the login node, with no `setup`: the interpreter raybridge itself runs in, e.g. the user's
    venv), and the versions the nodes must match (the login node's raybridge, Ray and Python; from a
    laptop, raybridge's own only)."""
    python, setup = spec.python, spec.setup
    # Inside a container the image's own python3 (or the profile's python) runs, never the login node's.
    if python is None and local and not setup and sys.executable and spec.container is None:
        python = sys.executable
        # What activating the venv does for commands: `python`, `ray` and the driver's own tools.
        setup = (f'export PATH={shlex.quote(os.path.dirname(python))}:"$PATH"',)
    versions = envcheck.encode(envcheck.versions(full=local))
    workdir = spec.workdir or (workdir_of(runner) if spec.container and runner else None)
    return dataclasses.replace(spec, python=python, setup=setup, expect_versions=versions, workdir=workdir)


def workdir_of(runner: Runner) -> str:
    """Where sbatch runs, so where the job's commands run (SLURM_SUBMIT_DIR): the container mounts it
    at the same path. On the login node over SSH that is the home folder."""
    return runner.home() if runner.host else os.getcwd()


def request(spec: ClusterSpec, runner: Runner) -> Request:
    """The request for spec as this runner would submit it (pure but for the runner's home folder)."""
    spec = complete(spec.with_home(runner.home()), local=not runner.host, runner=runner)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{spec.job_name}-{stamp}-{int(time.time() * 1000) % 1000:03d}"
    return Request(spec, render(spec), spec.layout.script(name), spec.layout.output)


def submit(spec: ClusterSpec, runner: Runner) -> Cluster:
    """Write the request's script into <shared_dir>/scripts and sbatch it. Returns at once."""
    req = request(spec, runner)
    spec = req.spec
    doctor.refuse(spec, runner)  # the login node's own checks: one line, before Slurm is asked
    layout = spec.layout
    for d in (layout.path, layout.scripts, layout.logs, layout.jobs):
        runner.makedirs(d)
    runner.write_text(req.path, req.script, mode=0o700)  # for people to read: sbatch gets the text
    sub = SlurmClient(runner).submit_text(req.script, req.output)
    c = Cluster(
        runner, sub.job_id, spec.job_dir(sub.job_id), expected=spec.total_nodes, submitted_at=sub.submitted_at
    )
    c.python = spec.python or "python3"
    c.image = spec.container.image if spec.container else None
    # What the head submits when a node dies (agent/replace.py) or Ray's autoscaler wants one.
    if spec.replace_lost or spec.autoscaling:
        folder = c.dir
        runner.makedirs(folder.path)  # (0700; the job's own start finds it there)
        runner.write_text(folder.member_script, render_member(member_spec(spec, sub.job_id, None)))
    return c


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


def add_members(cluster: Cluster, spec: ClusterSpec, count: int) -> list[str]:
    """Submit `count` one-node member jobs that join the cluster (`raybridge scale --add`; with their
    own partition, GPUs, ... for another worker group); their job ids. The cluster must be running
    (its head up); the jobs get the cluster's remaining time."""
    if not 1 <= count <= 1000:
        raise ClusterError(f"--add must be between 1 and 1000, got {count}")
    job = cluster.job()
    info = cluster.info()
    if job is None or job.state != "running" or info is None or info.head is None:
        raise ClusterError(f"job {cluster.job_id} has no running Ray cluster to add nodes to")
    within_limit(cluster, info, count)
    runner = cluster.runner
    spec = member_spec(
        complete(spec.with_home(runner.home()), local=not runner.host, runner=runner),
        cluster.job_id,
        spec.time,
    )
    layout = spec.layout
    runner.makedirs(layout.scripts)
    ids = []
    for _ in range(count):
        path = layout.script(f"{spec.job_name}-member-{time.time_ns()}")
        script = render_member(spec)
        runner.write_text(path, script, mode=0o700)  # for people to read: sbatch gets the text
        rec = cluster.members.submit(
            script,
            layout.output,
            copy=path,
            time_limit=spec.time,
            partition=spec.partition,
            gpus_per_node=spec.gpus_per_node,
            labels=spec.labels,
        )
        ids.append(rec.job_id)
    return ids


def within_limit(cluster: Cluster, info: ClusterRecord, count: int) -> None:
    """An autoscaled cluster stays within its --max-nodes: nodes added by hand count too."""
    limits = autoscale.limits(cluster.runner.read_text(autoscale.config_path(cluster.job_dir)))
    if limits is None:
        return
    members = sum(1 for m in cluster.members.listing() if m.active and m.record.released_at is None)
    now = info.expected_nodes + members
    if now + count > limits["max_nodes"]:
        raise ClusterError(
            f"job {cluster.job_id} autoscales up to {limits['max_nodes']} nodes and has {now} "
            f"({info.expected_nodes} in the allocation, {members} member jobs): --add {count} would "
            "go beyond it"
        )
