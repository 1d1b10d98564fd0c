"""One generation of a `raybridge serve` chain, run as the batch driver on the head node.

    python -m raybridge.agent serve NAME GENERATION -- COMMAND...

Every allocation of a service runs the same app (COMMAND, which deploys with Ray Serve's own API:
`serve.run(...)`) on a fresh cluster. This generation:

1. starts Serve with its HTTP proxy on the head only, bound to 127.0.0.1 (nobody else on the node's
   network reaches it), on a port of the job's own block;
2. runs COMMAND (a child process; it may return once deployed, or block) and waits until every Serve
   application is RUNNING;
3. opens the *front*: a port on the head's fabric address that passes a request to the proxy only with
   this generation's bearer token (a fresh random one, mode 0600 in the private job folder), one request
   per connection;
4. checks its own health through the front (Serve's /-/healthz and /-/routes), then takes over: it writes
   <shared_dir>/serve/NAME/current.json (atomically), which `raybridge endpoint NAME` follows;
5. serves until a newer generation has taken over (then, after a grace for endpoints to switch, Serve's
   own shutdown drains what is in flight), `raybridge down`, or the job's end.

A generation that fails before it took over leaves the one before it serving, and says so in one event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from raybridge import jobdir as jd
from raybridge import trust
from raybridge.agent.driver import driver_env, say, wait_alive
from raybridge.layout import SharedDir
from raybridge.settings import AgentSettings

SERVE_OFFSET, FRONT_OFFSET = 9, 10  # in the job's port block: between Ray's named ports and workers
READY_TIMEOUT = 300.0  # seconds for the app to deploy
GRACE = 3.0  # seconds the old generation serves on after a handover (endpoints look every 0.5 s)
HEAD_LIMIT = 64 << 10


@dataclass(frozen=True)
class ServeRecord:
    """<shared_dir>/serve/NAME/current.json: the generation that serves now."""

    name: str
    generation: int
    job_id: str
    address: str  # ip:port of the front
    token_path: str  # the front's bearer token (the job folder's, mode 0600)
    ready_at: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ServeRecord:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def folder_of(shared_dir: str, name: str) -> str:
    return SharedDir(shared_dir).join("serve", name)


def read_current(shared_dir: str, name: str) -> ServeRecord | None:
    path = os.path.join(folder_of(shared_dir, name), "current.json")
    try:
        return ServeRecord.from_json(trust.read_private(path))
    except (OSError, ValueError, KeyError, TypeError, trust.TrustError):
        return None


def history(shared_dir: str, name: str, event: str, **detail: object) -> None:
    """One line in <shared_dir>/serve/NAME/history.jsonl (status shows it)."""
    line = json.dumps({"at": time.time(), "event": event, **detail}, sort_keys=True)
    with contextlib.suppress(OSError):
        fd = os.open(
            os.path.join(folder_of(shared_dir, name), "history.jsonl"),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
            0o600,
        )
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")


# ---------------------------------------------------------------------- the front


class Front:
    """The head's authenticated entry to Serve's proxy: one request per connection, with the bearer
    token (removed before the request goes on), else 401. Counts what it passed on."""

    def __init__(self, host: str, port: int, target: tuple[str, int], token: str):
        self.target, self.token = target, token.encode()
        self.requests = 0
        self.sock = socket.create_server((host, port), backlog=128)
        threading.Thread(target=self._accept, name="raybridge-serve-front", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # shutdown first: it wakes the accept() of the other thread
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < HEAD_LIMIT:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            given = b""
            kept = [lines[0]]
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                low = key.strip().lower()
                if low == b"authorization":
                    given = value.strip().removeprefix(b"Bearer ").strip()
                elif low not in (b"connection", b"keep-alive"):
                    kept.append(line)
            if not sep or not hmac.compare_digest(given, self.token):
                conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            self.requests += 1
            with socket.create_connection(self.target, timeout=30) as up:
                up.sendall(b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n" + rest)
                done = threading.Event()

                def upload() -> None:  # the rest of a request body
                    with contextlib.suppress(OSError):
                        while not done.is_set() and (chunk := conn.recv(65536)):
                            up.sendall(chunk)

                threading.Thread(target=upload, daemon=True).start()
                while chunk := up.recv(65536):
                    conn.sendall(chunk)
                done.set()


# ---------------------------------------------------------------------- one generation


def next_refused(folder: jd.JobDir) -> str | None:
    """Slurm's words when the batch script could not queue the next generation (none queued)."""
    if os.path.exists(folder.chain_next):
        return None
    try:
        text = trust.read_private(folder.join("serve-next-refused")).strip()
    except (OSError, trust.TrustError):
        return None
    return " ".join(text.split())[:300] or None


def healthy(address: str, token: str) -> str | None:
    """Why the front (and so Serve's proxy and apps) is not healthy, or None."""
    for path in ("/-/healthz", "/-/routes"):
        req = urllib.request.Request(f"http://{address}{path}", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status != 200:
                    return f"{path} answered {r.status}"
        except (urllib.error.URLError, OSError) as e:
            return f"{path}: {getattr(e, 'reason', e)}"
    return None


def apps_running(serve) -> tuple[bool, str]:  # type: ignore[no-untyped-def]
    apps = serve.status().applications
    if not apps:
        return False, "no application deployed yet"
    states = {name: str(getattr(a.status, "value", a.status)) for name, a in apps.items()}
    bad = {n: s for n, s in states.items() if s != "RUNNING"}
    if any(s in ("DEPLOY_FAILED", "UNHEALTHY") for s in bad.values()):
        raise RuntimeError(f"applications failed: {bad}")
    return not bad, ", ".join(f"{n} {s}" for n, s in states.items())


def main(settings: AgentSettings, argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--" or not argv[1].isdigit():
        print("raybridge agent: usage: serve NAME GENERATION -- COMMAND...", file=sys.stderr)
        return 2
    name, generation, command = argv[0], int(argv[1]), argv[3:]
    folder = jd.JobDir(settings.job_dir)
    shared = settings.shared_dir
    job = settings.job_id
    host = socket.gethostname().split(".")[0]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    os.makedirs(folder_of(shared, name), mode=0o700, exist_ok=True)
    try:
        info = wait_alive(folder, settings.ready_timeout, lambda: not stop.is_set())
    except Exception as e:  # noqa: BLE001 - one line, the cluster's own reason
        history(shared, name, "generation_failed", generation=generation, job_id=job, detail=str(e))
        say(f"serve {name}: generation {generation} has no cluster: {e}")
        return 1
    os.environ |= driver_env(settings, folder) | {"RAY_ADDRESS": info.address or ""}
    base = info.head.ports["gcs"] if info.head else 0
    ip = info.head.ip if info.head else "127.0.0.1"
    serve_port, front_port = base + SERVE_OFFSET, base + FRONT_OFFSET
    child: subprocess.Popen[bytes] | None = None
    front: Front | None = None
    took_over = False
    try:
        import ray
        from ray import serve

        ray.init(log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": serve_port})
        say(f"serve {name}: generation {generation}: running {' '.join(command)}")
        child = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            ok, what = apps_running(serve)
            if ok:
                break
            if child.poll() not in (None, 0):
                raise RuntimeError(f"the app's command exited with code {child.returncode} ({what})")
            if time.monotonic() > deadline or stop.is_set():
                raise RuntimeError(f"the app did not become ready within {READY_TIMEOUT:.0f}s ({what})")
            time.sleep(0.5)
        token = secrets.token_urlsafe(32)
        token_path = folder.join("serve-token")
        trust.write_atomic(token_path, token + "\n", mode=0o600)
        front = Front(ip, front_port, ("127.0.0.1", serve_port), token)
        address = f"{ip}:{front_port}"
        if why := healthy(address, token):
            raise RuntimeError(f"health check failed: {why}")
        before = read_current(shared, name)
        record = ServeRecord(name, generation, job, address, token_path, time.time())
        trust.write_atomic(
            os.path.join(folder_of(shared, name), "current.json"), record.to_json(), mode=0o600
        )
        took_over = True
        jd.add_event(folder, "serving", host, f"generation {generation} of {name} at {address}")
        history(
            shared, name, "handover" if before else "serving", generation=generation, job_id=job,
            address=address, previous=before.job_id if before else None,
        )  # fmt: skip
        say(f"serve {name}: generation {generation} (job {job}) serves at {address}")
        refused = next_refused(folder)
        if refused:
            history(
                shared, name, "next_generation_refused", generation=generation, job_id=job, detail=refused
            )
            say(
                f"serve {name}: Slurm refused the next generation ({refused}); this one serves until its limit"
            )
        while not stop.is_set():
            current = read_current(shared, name)
            if current and current.generation > generation:
                say(f"serve {name}: generation {current.generation} (job {current.job_id}) took over")
                stop.wait(GRACE)  # endpoints switch; requests already here finish below
                break
            if os.path.exists(folder.stop):
                break
            stop.wait(0.5)
        return 0
    except Exception as e:  # noqa: BLE001 - reported as one event and line
        if not took_over:
            history(shared, name, "generation_failed", generation=generation, job_id=job, detail=str(e)[:500])
            say(f"serve {name}: generation {generation} failed before taking over: {e}")
        return 1
    finally:
        if front:
            history(shared, name, "ended", generation=generation, job_id=job, requests=front.requests)
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()  # Serve's own drain: proxies stop taking requests, replicas finish theirs
        if front:
            front.close()
        if child and child.poll() is None:
            child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
