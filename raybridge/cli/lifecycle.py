"""render / up / run / status / down / profiles."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from raybridge import cluster as lib
from raybridge.errors import RaybridgeError
from raybridge.profile import ClusterSpec, list_profiles, load_spec
from raybridge.render import render
from raybridge.runner import Runner, open_runner

Profile = Annotated[str | None, typer.Option("--profile", "-p", help="Profile name or YAML path.")]
Nodes = Annotated[int | None, typer.Option("--nodes", "-N", help="Number of nodes.")]
Partition = Annotated[str | None, typer.Option(help="Slurm partition.")]
Time = Annotated[str | None, typer.Option("--time", "-t", help="Time limit (Slurm format).")]
Account = Annotated[str | None, typer.Option(help="Slurm account.")]
Qos = Annotated[str | None, typer.Option(help="Slurm QOS.")]
Gpus = Annotated[int | None, typer.Option(help="GPUs per node.")]
Cpus = Annotated[int | None, typer.Option(help="CPUs per node.")]
Mem = Annotated[str | None, typer.Option("--mem", help="Memory per node, e.g. 64G.")]
JobName = Annotated[str | None, typer.Option(help="Slurm job name.")]
SbatchArg = Annotated[
    list[str] | None, typer.Option("--sbatch-arg", help="Extra sbatch option (repeatable).")
]
Login = Annotated[
    str | None, typer.Option(help="Login node [user@]host (or ~/.ssh/config alias): remote mode.")
]
AcceptKey = Annotated[
    bool, typer.Option("--accept-new-host-key", help="Trust and record an unknown host key.")
]
Spare = Annotated[
    int | None, typer.Option("--spare-nodes", help="Extra nodes that take over when one fails.")
]
SignalBefore = Annotated[
    int | None,
    typer.Option("--signal-before", help="Seconds before the time limit to ask training to checkpoint."),
]
Requeue = Annotated[
    bool | None,
    typer.Option("--requeue/--no-requeue", help="Requeue after a time-limit/preemption checkpoint."),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the cluster (0 = no limit).")]


def build_spec(
    profile: str | None,
    command: list[str] | None = None,
    login: str | None = None,
    accept_new_host_key: bool = False,
    **overrides: Any,
) -> ClusterSpec:
    spec = load_spec(profile, command=command, login=login, **overrides)
    if accept_new_host_key:
        if spec.login is None:
            raise RaybridgeError("--accept-new-host-key needs a login host (--login or the profile's login)")
        spec = dataclasses.replace(spec, login=dataclasses.replace(spec.login, accept_new_host_key=True))
    return spec


@contextlib.contextmanager
def connected(spec: ClusterSpec) -> Iterator[Runner]:
    runner = open_runner(spec.login)
    try:
        yield runner
    finally:
        runner.close()


# CLI flag → profile key, for the flags that override a profile.
FLAG_KEYS = {
    "nodes": "nodes",
    "partition": "partition",
    "time": "time",
    "account": "account",
    "qos": "qos",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_node": "cpus_per_node",
    "mem": "memory_per_node",
    "job_name": "job_name",
    "sbatch_arg": "sbatch_args",
    "spare_nodes": "spare_nodes",
    "signal_before": "signal_seconds",
    "requeue": "requeue",
}


def slurm_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """A command's parameters → profile overrides (None = not given, the profile decides)."""
    return {key: params[flag] for flag, key in FLAG_KEYS.items() if flag in params}


@contextlib.contextmanager
def submitted(spec: ClusterSpec, runner: Runner) -> Iterator[lib.Cluster]:
    """Submit; on Ctrl-C cancel the job so no allocation is left behind."""
    c = lib.submit(spec, runner)
    say(f"submitted job {c.job_id} ({spec.nodes} nodes) on {runner.host or 'this host'}")
    try:
        yield c
    except KeyboardInterrupt:
        say(f"interrupted: cancelling job {c.job_id}")
        c.slurm.cancel(c.job_id)
        raise


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary(info: dict[str, Any], spec: ClusterSpec, runner: Runner) -> str:
    head = info.get("head", {})
    nodes = info.get("nodes", [])
    took = ""
    if info.get("ready_at") and info.get("submitted_at"):
        took = f", {info['ready_at'] - info['submitted_at']:.1f}s from submission"
    dash_port = (info.get("ports") or {}).get("dashboard")
    lines = [
        f"Ray cluster ready: job {info['job_id']}, {len(nodes)} nodes{took}",
        f"  head       {head.get('hostname')} {info.get('address')}",
        f"  dashboard  {info.get('dashboard_url')}"
        + ("  (token auth)" if info.get("auth") == "token" else ""),
    ]
    if info.get("token_path"):
        lines.append(f"  token      {info['token_path']}  (mode 0600)")
    lines.append("  nodes      " + ", ".join(f"{n.get('hostname')} {n.get('ip')}" for n in nodes))
    login = runner.host or "<login-node>"
    lines += [
        "Connect:",
        f"  raybridge tunnel {info['job_id']}      # dashboard + Jobs API on http://127.0.0.1:8265",
        f"  ssh -N -L 8265:{head.get('ip')}:{dash_port} {login}   # plain OpenSSH",
        f"  raybridge down {info['job_id']}",
    ]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("render")
    def render_cmd(
        nodes: Nodes = None,
        profile: Profile = None,
        partition: Partition = None,
        time: Time = None,
        account: Account = None,
        qos: Qos = None,
        gpus_per_node: Gpus = None,
        cpus_per_node: Cpus = None,
        mem: Mem = None,
        job_name: JobName = None,
        sbatch_arg: SbatchArg = None,
        spare_nodes: Spare = None,
        signal_before: SignalBefore = None,
        requeue: Requeue = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
        command: Annotated[
            list[str] | None, typer.Argument(help="Driver command (batch mode), after --.")
        ] = None,
    ) -> None:
        """Print the sbatch script (it also runs with plain `sbatch`)."""
        spec = build_spec(
            profile,
            command or None,
            **slurm_overrides(locals()),
        )
        if spec.shared_dir.startswith("~"):
            spec = spec.with_home(str(Path.home()))
        text = render(spec)
        if output:
            try:
                output.write_text(text)
            except OSError as e:
                raise RaybridgeError(f"cannot write {output}: {e.strerror}") from None
            say(f"wrote {output}")
        else:
            sys.stdout.write(text)

    @app.command("up")
    def up_cmd(
        nodes: Nodes = None,
        profile: Profile = None,
        partition: Partition = None,
        time: Time = None,
        account: Account = None,
        qos: Qos = None,
        gpus_per_node: Gpus = None,
        cpus_per_node: Cpus = None,
        mem: Mem = None,
        job_name: JobName = None,
        sbatch_arg: SbatchArg = None,
        spare_nodes: Spare = None,
        signal_before: SignalBefore = None,
        requeue: Requeue = None,
        login: Login = None,
        accept_new_host_key: AcceptKey = False,
        json_out: Json = False,
        timeout: Timeout = 900,
    ) -> None:
        """Submit a Ray cluster job and wait until every node has joined."""
        spec = build_spec(
            profile,
            None,
            login,
            accept_new_host_key,
            **slurm_overrides(locals()),
        )
        with connected(spec) as runner, submitted(spec, runner) as c:
            info = c.wait_ready(timeout or None, on_progress=lambda p: say(p.line()))
            if json_out:
                print(json.dumps(lib.status_record(c), indent=2, sort_keys=True))
            else:
                print(summary(info, spec, runner))

    @app.command("run", context_settings={"allow_interspersed_args": False})
    def run_cmd(
        command: Annotated[list[str], typer.Argument(help="Driver command, after --.")],
        nodes: Nodes = None,
        profile: Profile = None,
        partition: Partition = None,
        time: Time = None,
        account: Account = None,
        qos: Qos = None,
        gpus_per_node: Gpus = None,
        cpus_per_node: Cpus = None,
        mem: Mem = None,
        job_name: JobName = None,
        sbatch_arg: SbatchArg = None,
        spare_nodes: Spare = None,
        signal_before: SignalBefore = None,
        requeue: Requeue = None,
        login: Login = None,
        accept_new_host_key: AcceptKey = False,
        timeout: Timeout = 900,
    ) -> None:
        """Bring up a cluster, run COMMAND on the head node with RAY_ADDRESS set, tear down.
        Exits with the command's exit code."""
        spec = build_spec(
            profile,
            command,
            login,
            accept_new_host_key,
            **slurm_overrides(locals()),
        )
        with connected(spec) as runner, submitted(spec, runner) as c:
            c.wait_ready(timeout or None, on_progress=lambda p: say(p.line()), ended_ok=True)
            say(f"cluster ready; running: {' '.join(command)}")
            job = c.follow_output(lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            code = job.exit_code if job and job.exit_code is not None else 1
            say(f"job {c.job_id} finished: {job.slurm_state if job else 'unknown'}, exit code {code}")
            raise typer.Exit(code)

    @app.command("status")
    def status_cmd(
        job: Annotated[str | None, typer.Argument(help="Job id (default: all your raybridge jobs).")] = None,
        profile: Profile = None,
        login: Login = None,
        accept_new_host_key: AcceptKey = False,
        json_out: Json = False,
    ) -> None:
        """Slurm state and Ray state (nodes, addresses, dashboard) of your raybridge jobs."""
        spec = build_spec(profile, None, login, accept_new_host_key)
        with connected(spec) as runner:
            if job:
                clusters = [lib.attach(spec, runner, job)]
            else:
                slurm = lib.SlurmClient(runner)
                clusters = [
                    lib.Cluster(runner, j.job_id, lib.job_dir_for(spec, runner, j.job_id, j))
                    for j in slurm.my_jobs()
                ]
            records = [lib.status_record(c) for c in clusters]
        if json_out:
            print(json.dumps(records if job is None else records[0], indent=2, sort_keys=True))
            return
        if not records:
            print("no raybridge jobs")
        for r in records:
            print(
                f"job {r['job_id']} ({r['name']}): Slurm {r['slurm_state']}, Ray {r['ray_state']}, "
                f"{r['alive_nodes']}/{r['expected_nodes'] or '?'} nodes alive"
            )
            if r["dashboard_url"]:
                print(f"  address {r['address']}  dashboard {r['dashboard_url']}")
            for n in r["nodes"]:
                print(
                    f"  {'alive' if n.get('alive') else 'DEAD ':5} {n.get('hostname', '?'):12} {n.get('ip', '?'):16}"
                    f" cpus={n.get('ray_cpus', n.get('cpus'))} gpus={n.get('ray_gpus', n.get('gpus'))}"
                )

    @app.command("down")
    def down_cmd(
        job: Annotated[str | None, typer.Argument(help="Job id.")] = None,
        all_jobs: Annotated[bool, typer.Option("--all", help="Stop all your raybridge jobs.")] = False,
        profile: Profile = None,
        login: Login = None,
        accept_new_host_key: AcceptKey = False,
    ) -> None:
        """Stop a cluster: only this job's Ray processes, then the Slurm job. Idempotent."""
        if not job and not all_jobs:
            raise RaybridgeError("name a job id, or pass --all")
        spec = build_spec(profile, None, login, accept_new_host_key)
        with connected(spec) as runner:
            if all_jobs:
                jobs = lib.SlurmClient(runner).my_jobs()
                clusters = [
                    lib.Cluster(runner, j.job_id, lib.job_dir_for(spec, runner, j.job_id, j)) for j in jobs
                ]
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

    @app.command("profiles")
    def profiles_cmd() -> None:
        """List the profiles raybridge can find."""
        found = list_profiles()
        if not found:
            print("no profiles found")
        for name, path in found:
            print(f"{name:24} {path}")
