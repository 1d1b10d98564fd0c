"""checkpoints ls / pull: Ray Train checkpoints on shared storage, copied here verified."""

from __future__ import annotations

import posixpath
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from raybridge.cli.common import AcceptKey, Login, Profile, connected, say, spec_from
from raybridge.client import checkpoints as ck
from raybridge.errors import RaybridgeError

app = typer.Typer(help="Ray Train checkpoints on shared storage.", no_args_is_help=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class Bar:
    """Bytes, rate and time left on a terminal, five times a second; silent when stderr is not one
    (a log or a pipe gets the final summary line only)."""

    def __init__(self, label: str, enabled: bool | None = None):
        self.label, self.start, self.last, self.finished = label, 0.0, 0.0, False
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.first = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.start:
            self.start, self.first = now, done  # the rate counts what this pull copies
        if not self.enabled or self.finished or (now - self.last < 0.2 and done < total):
            return
        self.finished = done >= total
        self.last = now
        frac = done / total if total else 1
        rate = (done - self.first) / max(now - self.start, 1e-6)
        left = f"{(total - done) / rate:4.0f}s left" if rate > 0 and done < total else " " * 9
        bar = "#" * int(frac * 30)
        sys.stderr.write(
            f"\r{self.label} [{bar:30}] {frac:6.1%} {human(done)}/{human(total)} {human(rate)}/s {left}"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@app.command("ls")
def ls_cmd(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="Run name (default: list runs).")] = None,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """List runs, or the checkpoints of one run (oldest first)."""
    spec = spec_from(ctx)
    with connected(spec) as runner:
        shared = spec.with_home(runner.home()).shared_dir
        if run is None:
            runs = ck.list_runs(runner, shared)
            print("\n".join(runs) if runs else f"no runs under {ck.runs_dir(shared)}")
            return
        check_name(run)
        cps = ck.list_checkpoints(runner, posixpath.join(ck.runs_dir(shared), run))
    if not cps:
        print(f"run {run}: no checkpoints")
    for c in cps:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.mtime))
        warn = f"  ({c.unsafe} file names raybridge will not copy: pull refuses it)" if c.unsafe else ""
        warn += "" if c.complete else "  (incomplete: no completion marker)"
        print(f"{c.name:40} {c.files:5} files {human(c.size):>10}  {stamp}{warn}")


@app.command("pull")
def pull_cmd(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    dest: Annotated[Path, typer.Argument(help="Local folder to copy into.")],
    latest: Annotated[
        bool, typer.Option("--latest", help="The newest complete checkpoint (default).")
    ] = False,
    name: Annotated[str | None, typer.Option("--name", help="A checkpoint by name.")] = None,
    streams: Annotated[
        int,
        typer.Option(
            "--streams",
            min=1,
            max=16,
            help="Parallel copy streams (SSH connections; default: one per core, up to 4).",
        ),
    ] = ck.transfer.STREAMS,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """Copy a checkpoint here; verified by sha256, resumable, never half-visible."""
    if latest and name:
        raise RaybridgeError("give --latest or --name, not both")
    check_name(run)
    spec = spec_from(ctx)
    with connected(spec) as runner:
        shared = spec.with_home(runner.home()).shared_dir
        cps = ck.list_checkpoints(runner, posixpath.join(ck.runs_dir(shared), run))
        if not cps:
            raise RaybridgeError(f"run {run} has no checkpoints")
        chosen = ck.choose(run, cps, name)
        dest.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        final = ck.pull(runner, chosen.path, dest, Bar(chosen.name), streams=streams, complete=True)
        took = time.monotonic() - started
    say(
        f"pulled {chosen.name} ({chosen.files} files, {human(chosen.size)}, sha256 verified) to {final} "
        f"in {took:.1f}s ({human(chosen.size / max(took, 1e-6))}/s)"
    )


def check_name(run: str) -> None:
    if not ck.safe_name(run):
        raise RaybridgeError(f"not a run name: {run[:100]!r}")
