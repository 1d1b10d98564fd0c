"""scale."""

from __future__ import annotations

from typing import Annotated

import typer

from raybridge.cli.common import (
    CLUSTER_ONLY,
    AcceptKey,
    Login,
    Profile,
    connected,
    flag_name,
    say,
    spec_from,
    with_spec_options,
)
from raybridge.client import cluster as lib
from raybridge.client import submission
from raybridge.errors import RaybridgeError


@with_spec_options
def scale_cmd(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="The cluster's job id.")],
    add: Annotated[
        int | None, typer.Option("--add", help="Add this many nodes (one member job each).")
    ] = None,
    remove: Annotated[
        int | None, typer.Option("--remove", help="Drain and release this many added nodes, newest first.")
    ] = None,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """Grow or shrink a running cluster with member jobs: --add K submits K one-node worker jobs that
    join its head (with --partition, --gpus-per-node, --cpus-per-node, --mem for another worker group); --remove K
    releases the newest added nodes (Ray's drain notice first). The cluster's own allocation stays."""
    if (add is None) == (remove is None):
        raise RaybridgeError("say --add K or --remove K")
    if not job.isdigit():
        raise RaybridgeError(f"not a Slurm job id: {job!r}")
    given = [flag_name(n) for n in CLUSTER_ONLY if ctx.params.get(n) is not None]
    if given:  # the cluster's own settings, fixed when it started
        raise RaybridgeError(f"{', '.join(given)}: set with `raybridge up`/`run`, not with scale")
    spec = spec_from(ctx)
    with connected(spec) as runner:
        c = lib.attach(spec, runner, job)
        if add is not None:
            ids = submission.add_members(c, spec, add)
            say(
                f"job {job}: submitted member job(s) {', '.join(ids)}; `raybridge status {job}` shows them join"
            )
            return
        assert remove is not None
        for member, what in c.members.remove(remove):
            say(f"job {job}: member job {member}: {what}")
