"""`raybridge endpoint NAME`: one local port that always reaches the generation of a service that serves
now, on the login node or through it from a laptop.

Clients send `Authorization: Bearer <the endpoint's token>` (a file of the user's, mode 0600; never the
Ray token, never the generations' own). Each request goes, on a connection of its own, to the front of
the generation named in <shared_dir>/serve/NAME/current.json (read again every half second), with that
generation's token instead. A request that cannot reach a generation that has just handed over is sent
once more to the new one, so a handover loses no request that had not reached a generation yet.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import posixpath
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from raybridge.agent.serve import ServeRecord
from raybridge.errors import RaybridgeError
from raybridge.layout import SharedDir
from raybridge.transport.runner import Runner

REFRESH = 0.5
HOP_BY_HOP = {"connection", "keep-alive", "authorization", "proxy-connection", "te", "upgrade", "host"}


def token_file(name: str) -> Path:
    config = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return config / "raybridge" / "endpoints" / f"{name}.token"


def client_token(name: str) -> tuple[str, Path]:
    """The endpoint's own token for clients (made once, mode 0600)."""
    path = token_file(name)
    if path.exists():
        return path.read_text().strip(), path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


@dataclass
class Target:
    record: ServeRecord
    token: str


class Router:
    """Which generation serves now (current.json on shared storage, through the runner)."""

    def __init__(self, runner: Runner, shared_dir: str, name: str):
        self.runner, self.name = runner, name
        self.path = SharedDir(shared_dir).join("serve", name, "current.json")
        self.lock = threading.Lock()
        self.target: Target | None = None
        self.read_at = 0.0
        self.switches = 0

    def current(self, fresh: bool = False) -> Target | None:
        with self.lock:
            if fresh or time.monotonic() - self.read_at >= REFRESH:
                self.read_at = time.monotonic()
                with contextlib.suppress(RaybridgeError, OSError, ValueError, KeyError, TypeError):
                    text = self.runner.read_text(self.path)
                    record = ServeRecord.from_json(text) if text else None
                    if record and (self.target is None or record != self.target.record):
                        token = (self.runner.read_text(record.token_path) or "").strip()
                        if token:
                            self.switches += self.target is not None
                            self.target = Target(record, token)
            return self.target

    def connect(self, target: Target) -> socket.socket:
        host, _, port = target.record.address.rpartition(":")
        if self.runner.host:  # from a laptop: a channel through the login node's SSH connection
            return self.runner.connect_tcp(host, int(port), timeout=5)
        return socket.create_connection((host, int(port)), timeout=5)


def make_handler(router: Router, token: str) -> type[BaseHTTPRequestHandler]:
    expected = token.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet: clients count, not us
            pass

        def _any(self) -> None:
            given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip().encode()
            if not hmac.compare_digest(given, expected):
                self._plain(401, "missing or wrong endpoint token\n")
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            kept = [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
            for attempt in (0, 1):
                target = router.current(fresh=attempt == 1)
                if target is None:
                    self._plain(503, f"service {router.name}: no generation serves yet\n")
                    return
                head = [f"{self.command} {self.path} HTTP/1.1", f"Host: {target.record.address}", *kept]
                head += [f"Authorization: Bearer {target.token}", "Connection: close"]
                try:
                    up = router.connect(target)
                except OSError:
                    continue  # gone: a newer generation may have taken over
                with contextlib.closing(up):
                    up.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                    first = up.recv(65536)
                    if not first:
                        continue  # closed before answering: try the one that serves now
                    self.close_connection = True
                    self.wfile.write(first)
                    while chunk := up.recv(65536):
                        self.wfile.write(chunk)
                    return
            self._plain(
                502, f"service {router.name}: generation {target.record.generation} does not answer\n"
            )

        def _plain(self, code: int, text: str) -> None:
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any

    return Handler


def serve_endpoint(runner: Runner, shared_dir: str, name: str, port: int, on_ready=None) -> None:  # type: ignore[no-untyped-def]
    """Run the endpoint until interrupted."""
    token, path = client_token(name)
    router = Router(runner, shared_dir, name)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(router, token))
    server.daemon_threads = True
    if on_ready:
        on_ready(server.server_address[1], path, router)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def serve_folder(shared_dir: str, name: str) -> str:
    return posixpath.join(SharedDir(shared_dir).path, "serve", name)
