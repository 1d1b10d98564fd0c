"""tunnel / submit / jobs / logs: reach a running cluster from a laptop."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from raybridge import jobdir as jd
from raybridge.cli.common import AcceptKey, JobArg, Login, Profile, connected, say, spec_from
from raybridge.client import cluster as lib
from raybridge.client.profile import ClusterSpec
from raybridge.errors import ClusterError, RaybridgeError


def access():  # -> the raybridge.client.access module
    """The tunnel and Jobs API code, loaded only by the commands that use it (paramiko, Ray)."""
    import raybridge.client.access

    return raybridge.client.access


def is_remote(runner: object) -> bool:
    from raybridge.transport.ssh import SSHRunner

    return isinstance(runner, SSHRunner)


@contextlib.contextmanager
def dashboard_address(spec: ClusterSpec, job: str | None) -> Iterator[tuple[str, Path | None, lib.Cluster]]:
    """The Jobs API address for a job: through a private tunnel in remote mode, direct on the login node."""
    with connected(spec) as runner:
        cluster = lib.attach(spec, runner, job)
        info = access().ready_info(cluster)
        token = access().fetch_token(cluster, info)
        if not is_remote(runner):
            yield info.dashboard_url or "", token, cluster
            return
        # Quiet: a failure shows up as the Jobs API client's error, in one line.
        fwd = access().make_forwarder(spec, cluster.job_dir, {"dashboard": 0}, token)
        fwd.start()
        try:
            yield f"http://127.0.0.1:{fwd.local_ports['dashboard']}", token, cluster
        finally:
            fwd.stop()


def print_connection(
    ports: dict[str, int], nonce: str, token: Path | None, job_id: str, head: jd.HeadRecord | None
) -> None:
    from raybridge.transport.tunnel import login_url

    dash = f"http://127.0.0.1:{ports['dashboard']}"
    where = f"head {head.hostname} {head.ip}" if head else "head unknown"
    print(f"tunnel to job {job_id} ({where}) is up")
    for name, port in ports.items():
        scheme = "http://" if name == "dashboard" else ""
        print(f"  {name:10} {scheme}127.0.0.1:{port}")
    if token:
        print(
            f"  browser    {login_url(ports['dashboard'], nonce)}   (signs this browser in, then shows the dashboard)"
        )
        print("For the Ray CLI and Jobs API (e.g. `ray job submit -- python x.py`):")
        print(f"  export RAY_ADDRESS={dash} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}")
    else:
        print(f"For the Ray CLI: export RAY_ADDRESS={dash}")
    sys.stdout.flush()


def tunnel_cmd(
    ctx: typer.Context,
    job: JobArg = None,
    local_port: Annotated[int, typer.Option(help="Local port for the dashboard / Jobs API.")] = 8265,
    ports: Annotated[str, typer.Option(help="What to forward: dashboard,client,gcs.")] = "dashboard",
    background: Annotated[bool, typer.Option("--background", help="Detach; stop with --stop.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop background tunnels (of JOB, or all).")] = False,
    login_link: Annotated[
        bool, typer.Option("--login-link", help="A new one-time browser sign-in link of a background tunnel.")
    ] = False,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """Forward the head's dashboard (and optionally client/GCS ports) to this machine."""
    from raybridge.client import tunnels

    if stop:
        stopped = tunnels.stop(job)
        if not stopped:
            say("no background tunnel" + (f" for job {job}" if job else ""))
        for job_id, pid, ran in stopped:
            say(
                f"stopped the tunnel for job {job_id} (pid {pid})"
                if ran
                else f"the tunnel for job {job_id} had already ended"
            )
        return
    if login_link:
        from raybridge.transport.tunnel import LINK_TTL_S, login_url

        port, nonce = tunnels.renew_link(job)
        print(login_url(port, nonce))
        say(f"one use, valid for {LINK_TTL_S / 60:.0f} minutes")
        return
    wanted = [p.strip() for p in ports.split(",") if p.strip()]
    bad = [p for p in wanted if p not in access().PORT_NAMES]
    if bad or "dashboard" not in wanted:
        raise RaybridgeError(f"--ports takes dashboard,client,gcs (dashboard always included), got {ports!r}")
    spec = spec_from(ctx)
    with connected(spec) as runner:
        cluster = lib.attach(spec, runner, job)
        info = access().ready_info(cluster)
        if not is_remote(runner):
            raise RaybridgeError(
                f"no tunnel needed on the login node: the dashboard is at {info.dashboard_url}"
            )
        token = access().fetch_token(cluster, info)
    local = {"dashboard": local_port}
    for name in wanted:
        if name != "dashboard":
            local[name] = access().DEFAULT_LOCAL[name] if local_port == 8265 else 0
    from raybridge.transport.tunnel import check_free

    for port in local.values():
        if port:
            check_free(port)
    if background:
        rec = tunnels.start(spec, cluster.job_dir, cluster.job_id, local, token)
        say(
            f"tunnel running in the background (pid {rec['pid']}); "
            f"stop it with: raybridge tunnel --stop {cluster.job_id}"
        )
        print_connection(rec["ports"], rec["nonce"], token, cluster.job_id, info.head)
        return
    fwd = access().make_forwarder(spec, cluster.job_dir, local, token, log=say)
    fwd.start()
    print_connection(fwd.local_ports, fwd.nonce, token, cluster.job_id, info.head)
    say("press Ctrl-C to close the tunnel")
    try:
        fwd.wait()
    except KeyboardInterrupt:
        say("tunnel closed")
    finally:
        fwd.stop()


def submit_cmd(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="Entrypoint, after --.")],
    job: Annotated[str | None, typer.Option("--job", "-j", help="Slurm job id (default: newest).")] = None,
    working_dir: Annotated[
        Path | None, typer.Option(help="Upload this folder as the job's working dir.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream logs; exit with the job's status.")
    ] = False,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """Submit a Ray job through the tunnel with Ray's Jobs API."""
    import shlex

    if command and command[0].isdigit():  # `submit 12 python x.py`: a job id is not a program
        raise RaybridgeError(
            f"the entrypoint starts with {command[0]!r}; to pick a cluster use "
            f"`raybridge submit --job {command[0]} -- {shlex.join(command[1:]) or 'COMMAND'}`"
        )
    if working_dir is not None and not working_dir.is_dir():
        raise RaybridgeError(f"--working-dir {working_dir} is not a folder")
    spec = spec_from(ctx)
    with dashboard_address(spec, job) as (address, token, _cluster):
        client = access().jobs_client(address, token)
        runtime_env = {"working_dir": str(working_dir)} if working_dir else None
        ray_job = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env)
        say(f"submitted Ray job {ray_job}")
        print(ray_job, flush=True)
        if not follow:
            return
        status = follow_job(client, ray_job)
    say(f"Ray job {ray_job}: {status}")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def jobs_cmd(
    ctx: typer.Context,
    job: JobArg = None,
    profile: Profile = None,
    login: Login = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the Ray jobs of a cluster."""
    spec = spec_from(ctx)
    with dashboard_address(spec, job) as (address, token, _):
        rows = access().jobs_client(address, token).list_jobs()
    recs = [
        {
            "id": r.submission_id or r.job_id,
            "status": str(r.status),
            "entrypoint": r.entrypoint,
            "start_time": r.start_time,
            "end_time": r.end_time,
        }
        for r in rows
    ]
    if json_out:
        print(json.dumps(recs, indent=2))
        return
    if not recs:
        print("no Ray jobs")
    for r in recs:
        print(f"{r['id'] or '-':32} {r['status']:10} {r['entrypoint']}")


def logs_cmd(
    ctx: typer.Context,
    job: JobArg = None,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    ray_job: Annotated[
        str | None, typer.Option("--ray-job", help="Show this Ray job's logs instead.")
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="Ray's own logs of this node (list them, or one with --ray).")
    ] = None,
    ray: Annotated[
        str | None, typer.Option("--ray", help="With --node: raylet, gcs, dashboard, monitor, ... ")
    ] = None,
    profile: Profile = None,
    login: Login = None,
) -> None:
    """The Slurm job's output (agents + driver), a Ray job's logs with --ray-job, or Ray's own logs of
    a node with --node (during the job, and kept after it)."""
    spec = spec_from(ctx)
    if ray and not node:
        raise RaybridgeError("--ray goes with --node (the node whose Ray logs to show)")
    if node:
        with connected(spec) as runner:
            show_node_logs(lib.attach(spec, runner, job), node, ray)
        return
    if ray_job:
        with dashboard_address(spec, job) as (address, token, _):
            client = access().jobs_client(address, token)
            if follow:
                follow_job(client, ray_job)
            else:
                try:
                    sys.stdout.write(client.get_job_logs(ray_job))
                except RuntimeError as e:
                    raise ClusterError(f"no Ray job {ray_job!r}: {str(e).splitlines()[0]}") from None
        return
    with connected(spec) as runner:
        cluster = lib.attach(spec, runner, job)
        job_info = cluster.job()
        path = cluster.log_path(job_info)
        if not path:
            raise ClusterError(f"Slurm does not know job {cluster.job_id}'s output file any more")
        if follow:
            cluster.follow_output(lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        else:
            text = runner.read_text(path)
            if text is None:
                raise ClusterError(f"no output yet at {path}")
            sys.stdout.write(text)


def show_node_logs(cluster: lib.Cluster, host: str, process: str | None) -> None:
    """Kept logs once the node's agent stopped; read on the node while the job runs."""
    from raybridge.client import nodelogs

    runner = cluster.runner
    kept = nodelogs.kept_files(runner, cluster.dir, host)
    if kept:
        files, read = kept, functools.partial(nodelogs.read_kept, runner, cluster.dir, host)
        where = f"kept in {cluster.dir.kept_logs(host)}"
    else:
        info = cluster.info()
        rec = next((n for n in info.nodes if n.hostname == host), None) if info else None
        job = cluster.job()
        if rec is None or not rec.temp_dir or job is None or job.state != "running":
            known = ", ".join(n.hostname or "?" for n in info.nodes) if info else "none recorded"
            raise ClusterError(f"no Ray logs of node {host!r} for job {cluster.job_id} (nodes: {known})")
        files = nodelogs.live_files(runner, cluster.job_id, host, rec.temp_dir)
        read = functools.partial(nodelogs.read_live, runner, cluster.job_id, host, rec.temp_dir)
        where = f"on {host}, live"
    chosen = nodelogs.wanted(files, process)
    if process is None:
        say(f"Ray's logs of {host} ({where}); show one process's with --ray NAME")
        print("\n".join(chosen))
        return
    if not chosen:
        raise ClusterError(f"no {process} log on {host} ({where})")
    for name in chosen:
        say(f"==> {host}/{name} ({where})")
        sys.stdout.write(read(name))
        sys.stdout.flush()


def follow_job(client: Any, ray_job: str) -> str:
    """Print a Ray job's logs as they come; return its final status."""
    offset = 0
    terminal = {"SUCCEEDED", "FAILED", "STOPPED"}
    while True:
        try:
            status = str(client.get_job_status(ray_job)).split(".")[-1]
            logs = client.get_job_logs(ray_job)
        except RuntimeError as e:
            raise ClusterError(f"no Ray job {ray_job!r}: {str(e).splitlines()[0]}") from None
        if len(logs) > offset:
            sys.stdout.write(logs[offset:])
            sys.stdout.flush()
            offset = len(logs)
        if status in terminal:
            return status
        time.sleep(0.5)
