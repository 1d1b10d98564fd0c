"""Background tunnels of this user on this machine (`raybridge tunnel --background`): start one
detached, find it again, ask it for a new sign-in link, stop it.

Each is a process of its own (a double of the CLI, forked and detached) with a record in
~/.cache/raybridge/tunnels/<job>.json (pid, start time, local ports, sign-in nonce; 0600) and its log
beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from raybridge.client import access
from raybridge.client.profile import ClusterSpec
from raybridge.errors import RaybridgeError
from raybridge.transport.runner import LocalRunner


def folder() -> Path:
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raybridge" / "tunnels"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def records(job: str | None) -> list[Path]:
    return sorted(folder().glob(f"{job or '*'}.json"))


def process(rec: dict[str, Any]) -> psutil.Process | None:
    """The background tunnel of this record, if it still runs (not another process with its pid)."""
    try:
        proc = psutil.Process(rec["pid"])
        if (
            abs(proc.create_time() - rec.get("started", proc.create_time())) > 1
            or "tunnel" not in proc.cmdline()
        ):
            return None
    except psutil.Error:
        return None
    return proc


def stop(job: str | None) -> list[tuple[str, int, bool]]:
    """Stop the background tunnels of job (or all): (job, pid, whether it still ran)."""
    out = []
    for f in records(job):
        rec = json.loads(f.read_text())
        proc = process(rec)
        if proc:
            proc.terminate()
            # Wait, so that its local ports are free when this returns (a new tunnel may want them).
            if psutil.wait_procs([proc], timeout=5)[1]:
                proc.kill()
        f.unlink(missing_ok=True)
        out.append((f.stem, rec["pid"], proc is not None))
    return out


def renew_link(job: str | None) -> tuple[int, str]:
    """Ask a background tunnel for a fresh sign-in link (the old one is single-use and short-lived):
    its dashboard port and the new nonce."""
    files = records(job)
    if not files:
        raise RaybridgeError("no background tunnel" + (f" for job {job}" if job else ""))
    if len(files) > 1:
        raise RaybridgeError("name the job: " + ", ".join(f.stem for f in files))
    rec = json.loads(files[0].read_text())
    proc = process(rec)
    if proc is None:
        raise RaybridgeError(f"the tunnel for job {files[0].stem} is not running (start it again)")
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while (new := json.loads(files[0].read_text()))["nonce"] == rec["nonce"]:
        if time.monotonic() > deadline:
            raise RaybridgeError(f"the tunnel for job {files[0].stem} did not answer")
        time.sleep(0.05)
    return new["ports"]["dashboard"], new["nonce"]


def start(
    spec: ClusterSpec, job_dir: str, job_id: str, local: dict[str, int], token: Path | None
) -> dict[str, Any]:
    """Fork a detached tunnel; its record once it listens (RaybridgeError with its error if not)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r) as pipe:
            msg = pipe.read()
        if not msg.startswith("{"):
            raise RaybridgeError(msg.strip() or "the background tunnel did not start")
        LocalRunner().write_text(str(folder() / f"{job_id}.json"), msg)
        return json.loads(msg)
    os.close(r)
    os.setsid()
    log = open(folder() / f"{job_id}.log", "a")  # noqa: SIM115 - lives as long as the daemon
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        fwd = access.make_forwarder(
            spec,
            job_dir,
            local,
            token,
            log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True),
        )
        fwd.start()
        me = {"pid": os.getpid(), "started": psutil.Process().create_time()}

        def record() -> str:
            return json.dumps(me | {"ports": fwd.local_ports, "nonce": fwd.nonce})

        # A new sign-in link (on request, or for a new token) goes where `--login-link` reads it.
        fwd.on_new_link = lambda _url: LocalRunner().write_text(str(folder() / f"{job_id}.json"), record())
        os.write(w, record().encode())
        os.close(w)
        signal.signal(signal.SIGTERM, lambda *_: fwd.stop())
        signal.signal(signal.SIGUSR1, lambda *_: fwd.renew_login())
        fwd.wait()
    except Exception as e:
        with contextlib.suppress(OSError):
            os.write(w, str(e).encode())
        os._exit(1)
    os._exit(0)
