"""serve / endpoint: a Ray Serve app that outlives every allocation, and one port that reaches it."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import time
from typing import Annotated

import typer

from raybridge.agent.serve import ServeRecord
from raybridge.cli.common import AcceptKey, Login, Profile, connected, say, spec_from, with_spec_options
from raybridge.cli.lifecycle import submitted, warn_if_open
from raybridge.client import endpoint as ep
from raybridge.client.profile import SAFE_NAME, time_to_seconds
from raybridge.errors import RaybridgeError


@with_spec_options
def serve_cmd(
    ctx: typer.Context,
    command: Annotated[
        list[str], typer.Argument(help="The app's command (it deploys with serve.run), after --.")
    ],
    name: Annotated[
        str, typer.Option("--name", help="The service's name (endpoint NAME reaches it).")
    ] = "serve",
    overlap: Annotated[
        int,
        typer.Option("--overlap", min=1, help="Minutes the next generation starts before this one's limit."),
    ] = 5,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            help="No generation starts after this: 2027-01-31T18:00 (local time), or +36h, +2d, +90m.",
        ),
    ] = None,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the first generation to serve.")] = 900,
) -> None:
    """Serve an app with Ray Serve across allocations: before each time limit the next allocation takes
    over (queued early, health-checked), the old one drains and ends; until `raybridge down`."""
    if not SAFE_NAME.fullmatch(name):
        raise RaybridgeError(f"--name {name[:80]!r} may hold only letters, digits, '.', '_' and '-'")
    spec = spec_from(ctx, command)
    minutes = (time_to_seconds(spec.time) or 0) // 60 if spec.time else 0
    if minutes < overlap + 1:
        raise RaybridgeError(
            f"serve needs a time limit of at least --overlap + 1 minutes (--time; got {spec.time or 'none'}, "
            f"--overlap {overlap})"
        )
    spec = dataclasses.replace(spec, serve=name, serve_overlap=overlap, serve_until=until_epoch(until))
    warn_if_open(spec.auth)
    with connected(spec) as runner, submitted(spec, runner) as c:
        c.wait_ready(timeout or None, on_progress=lambda p: say(p.line()), until="alive")
        shared = spec.with_home(runner.home()).shared_dir
        path = f"{ep.serve_folder(shared, name)}/current.json"
        deadline = time.monotonic() + (timeout or 1e9)
        while True:
            text = runner.read_text(path)
            record = ServeRecord.from_json(text) if text else None
            if record and record.job_id == c.job_id:
                break
            job = c.job()
            if job is None or job.finished or time.monotonic() > deadline:
                why = c.environment_error(job) or "see its log: " + c.log_path(job)
                raise RaybridgeError(f"service {name}: job {c.job_id} did not start serving ({why})")
            time.sleep(0.5)
    print(f"service {name}: generation {record.generation} (job {c.job_id}) serves at {record.address}")
    print(f"  reach it:  raybridge endpoint {name}      # a local port with its own token")
    print(f"  stop it:   raybridge down {c.job_id}")


def until_epoch(text: str | None, now: float | None = None) -> int | None:
    """--until as seconds since the epoch: an ISO date and time (local), or +N with m, h or d."""
    if text is None:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"\+(\d+)([mhd])", text.strip())
    if m:
        return int(now + int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[m.group(2)])
    try:
        when = datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise RaybridgeError(
            f"--until {text[:60]!r} is not a time (2027-01-31T18:00, +36h, +2d, +90m)"
        ) from None
    if when <= now:
        raise RaybridgeError(f"--until {text[:60]!r} is in the past")
    return int(when)


def endpoint_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The service's name (raybridge serve --name).")],
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Local port (0: any free one).")
    ] = 8000,
    status: Annotated[
        bool, typer.Option("--status", help="Print the service's generations and exit.")
    ] = False,
    profile: Profile = None,
    login: Login = None,
    accept_new_host_key: AcceptKey = False,
) -> None:
    """One local port that always reaches the generation of service NAME that serves now."""
    if not SAFE_NAME.fullmatch(name):
        raise RaybridgeError(f"not a service name: {name[:80]!r}")
    spec = spec_from(ctx)
    with connected(spec) as runner:
        shared = spec.with_home(runner.home()).shared_dir
        if status:
            text = runner.read_text(f"{ep.serve_folder(shared, name)}/history.jsonl") or ""
            for line in text.splitlines():
                with_time = json.loads(line)
                at = time.strftime("%H:%M:%S", time.localtime(with_time.pop("at")))
                print(at, with_time.pop("event"), " ".join(f"{k}={v}" for k, v in sorted(with_time.items())))
            if not text:
                print(f"service {name}: no history under {ep.serve_folder(shared, name)}")
            return

        def ready(bound: int, token_path, router) -> None:  # type: ignore[no-untyped-def]
            target = router.current()
            where = (
                f"generation {target.record.generation} (job {target.record.job_id})"
                if target
                else "none yet"
            )
            say(f"endpoint {name}: http://127.0.0.1:{bound}  (serving now: {where}; Ctrl-C to stop)")
            say(f"  clients send: Authorization: Bearer $(cat {token_path})")

        try:
            ep.serve_endpoint(runner, shared, name, port, on_ready=ready)
        except OSError as e:
            raise RaybridgeError(f"cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
        except KeyboardInterrupt:
            say(f"endpoint {name}: stopped")
