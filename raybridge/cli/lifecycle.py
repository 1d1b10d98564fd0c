"""render / up / run / status / down / profiles."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import posixpath
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from raybridge import jobdir as jd
from raybridge.cli.common import (
    AcceptKey,
    Json,
    Login,
    Profile,
    Timeout,
    connected,
    say,
    spec_from,
    with_spec_options,
)
from raybridge.client import checkpoints as ck
from raybridge.client import cluster as lib
from raybridge.client import status as st
from raybridge.client import submission, timeline
from raybridge.client.profile import ClusterSpec, list_profiles
from raybridge.errors import RaybridgeError
from raybridge.slurm import LOST
from raybridge.train import RUN_NAME_VAR
from raybridge.transport.runner import LocalRunner, Runner


@contextlib.contextmanager
def submitted(spec: ClusterSpec, runner: Runner) -> Iterator[lib.Cluster]:
    """Submit; on Ctrl-C cancel the job so no allocation is left behind."""
    c = submission.submit(spec, runner)
    say(f"submitted job {c.job_id} ({spec.nodes} nodes) on {runner.host or 'this host'}")
    try:
        yield c
    except KeyboardInterrupt:
        say(f"interrupted: cancelling job {c.job_id}")
        c.slurm.cancel(c.job_id)
        raise


def summary(info: jd.ClusterRecord, spec: ClusterSpec, runner: Runner) -> str:
    head = info.head
    took = ""
    if info.ready_at and info.submitted_at:
        took = f", {info.ready_at - info.submitted_at:.1f}s from submission"
    lines = [
        f"Ray cluster ready: job {info.job_id}, {len(info.nodes)} nodes{took}",
        f"  head       {head.hostname if head else '?'} {info.address}",
        f"  dashboard  {info.dashboard_url}" + ("  (token auth)" if info.auth == "token" else ""),
    ]
    if info.token_path:
        lines.append(f"  token      {info.token_path}  (mode 0600)")
    lines.append("  nodes      " + ", ".join(f"{n.hostname} {n.ip}" for n in info.nodes))
    if spec.autoscaling:
        low = spec.min_nodes or spec.total_nodes
        lines.append(
            f"  autoscale  {low} to {spec.max_nodes} nodes (Ray's autoscaler adds Slurm jobs for pending work; "
            f"idle ones leave after {spec.idle_timeout}s)"
        )
    login = runner.host or "<login-node>"
    lines += [
        "Connect:",
        f"  raybridge tunnel {info.job_id}      # dashboard + Jobs API on http://127.0.0.1:8265",
        f"  ssh -N -L 8265:{head.ip if head else '?'}:{info.ports.get('dashboard')} {login}   # plain OpenSSH",
        f"  raybridge down {info.job_id}",
    ]
    return "\n".join(lines)


@with_spec_options
def render_cmd(
    ctx: typer.Context,
    profile: Profile = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
    command: Annotated[
        list[str] | None, typer.Argument(help="Driver command (batch mode), after --.")
    ] = None,
) -> None:
    """Print the sbatch script (it also runs with plain `sbatch`)."""
    spec = spec_from(ctx, command)
    if spec.login is None:
        req = submission.request(spec, LocalRunner())
    else:  # the login node's home and Python are known only there
        with connected(spec) as runner:
            req = submission.request(spec, runner)
    text = req.script
    if output:
        try:
            output.write_text(text)
        except OSError as e:
            raise RaybridgeError(f"cannot write {output}: {e.strerror}") from None
        say(f"wrote {output}")
    else:
        sys.stdout.write(text)
    say(f"up/run submit it as: {req.sbatch_line()}")


@with_spec_options
def up_cmd(
    ctx: typer.Context,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
    json_out: Json = False,
    timeout: Timeout = 900,
) -> None:
    """Submit a Ray cluster job and wait until every node has joined."""
    spec = spec_from(ctx)
    warn_if_open(spec.auth)
    with connected(spec) as runner, submitted(spec, runner) as c:
        info = c.wait_ready(timeout or None, on_progress=lambda p: say(p.line()))
        if json_out:
            print(json.dumps(st.of(c).to_dict(), indent=2, sort_keys=True))
        else:
            print(summary(info, spec, runner))


@with_spec_options
def run_cmd(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="Driver command, after --.")],
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
    timeout: Timeout = 900,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume", metavar="RUN", help="Continue this training run (raybridge.train) in the new job."
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also show the node agents' own lines (always in the job log)."),
    ] = False,
) -> None:
    """Bring up a cluster, run COMMAND with RAY_ADDRESS set, tear down.
    Exits with the command's exit code."""
    spec = spec_from(ctx, command)
    if resume is not None:
        if not ck.safe_name(resume):
            raise RaybridgeError(f"not a run name: {resume[:100]!r}")
        spec = dataclasses.replace(spec, env=(*spec.env, (RUN_NAME_VAR, resume)))
    warn_if_open(spec.auth)
    with connected(spec) as runner, submitted(spec, runner) as c:
        c.wait_ready(timeout or None, on_progress=lambda p: say(p.line()), ended_ok=True, until="alive")
        say(f"all nodes alive; running: {' '.join(command)}")
        show = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
        out = show if verbose else lib.ProgramOutput(show)
        job = c.follow_output(out, on_requeue=say)
        while spec.chain > 1 and (nxt := c.chain_next()):  # `--chain`: the next allocation goes on
            say(f"job {c.job_id} ended at its time limit; the training continues in job {nxt}")
            c = lib.Cluster(runner, nxt, spec.job_dir(nxt), expected=spec.total_nodes)
            c.python, c.image = spec.python or "python3", spec.container.image if spec.container else None
            try:
                c.wait_ready(None, on_progress=lambda p: say(p.line()), ended_ok=True, until="alive")
                job = c.follow_output(out, on_requeue=say)
            except KeyboardInterrupt:
                say(f"interrupted: stopping job {c.job_id} and what is queued after it")
                c.stop()
                raise
        if not verbose:
            out.flush()
        code = job.exit_code if job and job.exit_code is not None else 1
        state = job.slurm_state if job else "unknown"
        if code == 0 and state != "COMPLETED":
            code = 1  # cancelled or failed from outside (a lost batch host): not the driver's success
        say(
            f"job {c.job_id} finished: {state}, exit code {code}"
            + (f"; its log: {c.log_path(job)}" if job else "")
        )
        if acct := c.accounting():
            say(f"job {c.job_id} used {acct.line()}")
        if code != 0 and state in LOST:
            say(lost_run_line(spec, runner, c.job_id, state, resume, command))
        raise typer.Exit(code)


def lost_run_line(
    spec: ClusterSpec, runner: Runner, job_id: str, state: str, resume: str | None, command: list[str]
) -> str:
    """One line: where the training run stands and the command that continues it in a new job."""
    shared = spec.with_home(runner.home()).shared_dir
    name = resume or f"{spec.job_name}-{job_id}"
    run_dir = posixpath.join(ck.runs_dir(shared), name)
    newest = ck.newest_complete(runner, run_dir)
    step = newest[1] if newest else None
    where = (
        f"its newest complete checkpoint is at step {step}"
        if step is not None
        else "it has no complete checkpoint"
    )
    again = shlex.join(["raybridge", "run", "--resume", name, *ctx_args(spec), "--", *command])
    return f"job {job_id} ended ({state}); training run {name}: {where}; continue it with: {again}"


def ctx_args(spec: ClusterSpec) -> list[str]:
    out = ["--nodes", str(spec.nodes)]
    if spec.profile and spec.profile != "(none)":
        out += ["--profile", spec.profile]
    return out


def status_cmd(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Argument(help="Job id (default: all your raybridge jobs).")] = None,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
    json_out: Json = False,
    show_timeline: Annotated[
        bool, typer.Option("--timeline", help="Every phase of the job with its time (also in --json).")
    ] = False,
    live: Annotated[
        bool, typer.Option("--watch", help="A live view of the job, refreshed until it ends (Ctrl-C leaves).")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes of --watch.")] = 2.0,
) -> None:
    """Slurm state and Ray state (nodes, addresses, dashboard) of your raybridge jobs."""
    spec = spec_from(ctx)
    if live:
        from raybridge.cli.watch import watch

        if json_out or show_timeline:
            raise RaybridgeError("--watch shows one live view: leave out --json and --timeline")
        if interval < 0.5:
            raise RaybridgeError("--interval must be at least 0.5 seconds")
        with connected(spec) as runner:
            last = watch(lib.attach(spec, runner, job), spec, interval)
        say(f"job {last.job_id}: Slurm {last.slurm}")
        return
    with connected(spec) as runner:
        clusters = [lib.attach(spec, runner, job)] if job else lib.mine(spec, runner)
        records = [st.of(c) for c in clusters]
    if json_out:
        dicts = [r.to_dict() for r in records]
        print(json.dumps(dicts if job is None else dicts[0], indent=2, sort_keys=True))
        return
    if not records:
        print("no raybridge jobs")
    for r in records:
        print(f"job {r.job_id} ({r.name}): Slurm {r.slurm_state}, Ray {r.ray_state}, {r.nodes_line()}")
        if r.dashboard_url:
            print(f"  address {r.address}  dashboard {r.dashboard_url}")
        if r.accounting:
            print(f"  accounting {r.accounting['summary']}")
        if a := r.autoscale:
            print(
                f"  autoscale  {a['min_nodes']} to {a['max_nodes']} nodes, idle nodes released after "
                f"{a['idle_timeout']}s, added nodes must join within {a['join_timeout']}s"
            )
        if r.auth == "none":
            print(f"  WARNING: {OPEN}")
        for n in r.nodes:
            print("  " + node_line(n.to_dict()))
        for m in r.members:
            pending = m.slurm_state == "PENDING"
            where = m.node or (f"reason {m.reason}" if pending and m.reason not in (None, "None") else "")
            how = ", autoscaled" if m.autoscaled else ""
            print(
                f"  member job {m.job_id} ({m.partition or 'default'}{how}): "
                f"Slurm {m.slurm_state}" + (f", {where}" if where else "")
            )
        if show_timeline:
            print("  timeline:")
            for line in timeline.lines(list(r.timeline)):
                print("    " + line)
            continue
        for e in r.events:
            stamp = time.strftime("%H:%M:%S", time.localtime(e.get("at") or 0))
            print(f"  {stamp} {e.get('event', '?')} {e.get('node', '')} {e.get('detail', '')}".rstrip())


def down_cmd(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Argument(help="Job id.")] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Stop all your raybridge jobs.")] = False,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """Stop a cluster: only this job's Ray processes, then the Slurm job. Idempotent."""
    if not job and not all_jobs:
        raise RaybridgeError("name a job id, or pass --all")
    spec = spec_from(ctx)
    with connected(spec) as runner:
        if all_jobs:
            clusters = lib.mine(spec, runner)
            if not clusters:
                say("no raybridge jobs")
        else:
            job_id = str(job)
            if not job_id.isdigit():
                raise RaybridgeError(f"not a Slurm job id: {job_id!r}")
            info = lib.SlurmClient(runner).job(job_id)
            if info is None:
                say(f"job {job_id}: already gone")
                return
            clusters = [lib.attach(spec, runner, job_id)]
        for c in clusters:
            say(f"job {c.job_id}: stopping")
            say(f"job {c.job_id}: {c.stop()}")


def profiles_cmd() -> None:
    """List the profiles raybridge can find."""
    found = list_profiles()
    if not found:
        print("no profiles found")
    for name, path in found:
        print(f"{name:24} {path}")


def node_line(n: dict) -> str:
    """One node of `status`: alive, where, what Ray sees, and how Ray was started there."""
    cpus = n["ray_cpus"] if n.get("ray_cpus") is not None else n.get("cpus")
    gpus = n["ray_gpus"] if n.get("ray_gpus") is not None else n.get("gpus")
    how = n.get("ray_started_by") or "?"
    if n.get("ray_start_reason"):
        how += f" ({n['ray_start_reason']})"
    return (
        f"{'alive' if n.get('alive') else 'left' if n.get('left') else 'DEAD':5} {n.get('hostname') or '?':12} {n.get('ip') or '?':16}"
        f" cpus={cpus} gpus={gpus}  ray started by: {how}"
    )


OPEN = (
    "token authentication is OFF (profile: auth: false): anyone who can reach the head's ports can run "
    "code in this cluster as you"
)


def warn_if_open(auth: bool) -> None:
    if not auth:
        say(f"warning: {OPEN}")
