"""The `raybridge` command: a thin layer over the library (cluster.py, profile.py, render.py)."""

from __future__ import annotations

import typer

from raybridge.cli import ckpt, lifecycle, remote
from raybridge.cli.errors import run_app

app = typer.Typer(
    name="raybridge",
    help="Ray clusters inside Slurm allocations: bring up, reach, train on and tear down.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
lifecycle.register(app)
remote.register(app)
app.add_typer(ckpt.app, name="checkpoints")


def main() -> None:
    run_app(app)
