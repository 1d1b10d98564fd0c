"""doctor, metrics."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from raybridge.cli.common import (
    AcceptKey,
    JobArg,
    Json,
    Login,
    Profile,
    connected,
    say,
    spec_from,
    with_spec_options,
)
from raybridge.client import cluster as lib
from raybridge.client import submission
from raybridge.errors import ClusterError


@with_spec_options
def doctor_cmd(
    ctx: typer.Context,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
    json_out: Json = False,
    login_only: Annotated[
        bool, typer.Option("--login-only", help="Only the checks on the login node (no Slurm job).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the doctor's Slurm step.")] = 300,
) -> None:
    """Check the login node and, through a short Slurm step, --nodes compute nodes: shared storage,
    interface and fabric, ports, temp path, /dev/shm, resources, NCCL/GLOO, versions, token auth.
    Exits 1 when a check fails."""
    from raybridge.client import doctor

    spec = spec_from(ctx)
    with connected(spec) as runner:
        spec = submission.complete(spec.with_home(runner.home()), local=not runner.host, runner=runner)
        checks = doctor.login_checks(spec, runner)
        if not login_only:
            say(f"doctor: running checks on {spec.nodes} compute node(s) (one short Slurm step)")
            checks += doctor.node_checks(spec, runner, spec.nodes, timeout)
    if json_out:
        print(json.dumps(doctor.as_json(checks), indent=2))
    else:
        print("\n".join(doctor.table(checks)))
        fails = sum(c.status == "fail" for c in checks)
        warns = sum(c.status == "warn" for c in checks)
        print(f"{len(checks)} checks: {fails} failed, {warns} warnings")
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


def metrics_cmd(
    ctx: typer.Context,
    job: JobArg = None,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
    json_out: Json = False,
) -> None:
    """Ray's metrics of every alive node now (scraped from the nodes' Prometheus endpoints), and
    the service-discovery file that points Prometheus at them."""
    from raybridge import metrics as rbm

    spec = spec_from(ctx)
    with connected(spec) as runner:
        c = lib.attach(spec, runner, job)
        info = c.info()
        if info is None or not info.nodes:
            raise ClusterError(f"job {c.job_id} has no Ray nodes yet")
        nodes = rbm.scrape(runner, info)
        shared = spec.with_home(runner.home()).shared_dir
    sd = rbm.sd_file(shared, c.job_id)
    if json_out:
        print(
            json.dumps({"job_id": c.job_id, "sd_file": sd, "nodes": [m.as_dict() for m in nodes]}, indent=2)
        )
        return
    print("\n".join(rbm.lines(nodes)))
    print(f"Prometheus targets: {sd}")
