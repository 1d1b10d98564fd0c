"""image stage: a container image prepared once on shared storage for every node (client/images.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from raybridge.cli.ckpt import human
from raybridge.cli.common import AcceptKey, Login, Profile, connected, say, spec_from
from raybridge.client import images
from raybridge.errors import RaybridgeError

app = typer.Typer(help="Container images on shared storage.", no_args_is_help=True)


@app.command("stage")
def stage_cmd(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="A folder or tar archive (Charliecloud), docker://REF or a .def (Apptainer), an image "
            "reference (podman), docker://REF (Pyxis/enroot)."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="The image's name under <shared_dir>/images.")],
    runtime: Annotated[
        str | None,
        typer.Option("--runtime", help="charliecloud, apptainer, podman or pyxis (default: the profile's)."),
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Stage it again over an existing one.")] = False,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """Prepare an image once on shared storage, in the runtime's own format, so the nodes share one copy."""
    spec = spec_from(ctx)
    runtime = runtime or (spec.container.runtime if spec.container else None)
    if runtime is None:
        raise RaybridgeError("which runtime? give --runtime or set container.runtime in the profile")
    with connected(spec) as runner:
        spec = spec.with_home(runner.home())
        staged = images.stage(
            spec,
            runner,
            runtime,
            source,
            name,
            replace=replace,
            on_progress=lambda size, took: say(f"  {human(size)} written, {took:.0f}s"),
            on_start=lambda dest: say(f"staging {source} for {runtime} into {dest}"),
        )
    say(f"staged {staged.path} ({human(staged.size)}) in {staged.seconds:.1f}s")
    print(f"container:\n  runtime: {runtime}\n  image: {staged.path}")
