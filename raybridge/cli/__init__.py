"""The `raybridge` command: a thin layer over the library (client/: profile, submission, cluster, status).
Every command is a module-level function in lifecycle.py, remote.py or ckpt.py, registered here."""

from __future__ import annotations

import typer

from raybridge import __version__
from raybridge.cli import ckpt, diagnose, elastic, image, lifecycle, remote, serving
from raybridge.cli.errors import run_app


def version_callback(value: bool) -> None:
    if value:
        print(f"raybridge {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="raybridge",
    help="Ray clusters inside Slurm allocations: bring up, reach, train on and tear down.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Ray clusters inside Slurm allocations: bring up, reach, train on and tear down."""


app.command("render")(lifecycle.render_cmd)
app.command("up")(lifecycle.up_cmd)
app.command("run", context_settings={"allow_interspersed_args": False})(lifecycle.run_cmd)
app.command("serve", context_settings={"allow_interspersed_args": False})(serving.serve_cmd)
app.command("endpoint")(serving.endpoint_cmd)
app.command("status")(lifecycle.status_cmd)
app.command("down")(lifecycle.down_cmd)
app.command("profiles")(lifecycle.profiles_cmd)
app.command("doctor")(diagnose.doctor_cmd)
app.command("scale")(elastic.scale_cmd)
app.command("metrics")(diagnose.metrics_cmd)
app.command("tunnel")(remote.tunnel_cmd)
app.command("submit", context_settings={"allow_interspersed_args": False})(remote.submit_cmd)
app.command("jobs")(remote.jobs_cmd)
app.command("logs")(remote.logs_cmd)
app.add_typer(ckpt.app, name="checkpoints")
app.add_typer(image.app, name="image")


def main() -> None:
    run_app(app)
