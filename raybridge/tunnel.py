"""Local ports forwarded through the login node to the Ray head (paramiko direct-tcpip).

One SSH connection carries every forwarded connection. If it drops, the forwarder reconnects with
backoff and re-reads the cluster record, so it follows the head when a requeued job lands elsewhere.
The dashboard port can also sign a browser in: GET /raybridge/login/<nonce> answers with Ray's auth
cookie and a redirect, so nobody copies tokens by hand.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paramiko

from raybridge.errors import RaybridgeError

COOKIE = "ray-authentication-token"  # what Ray's dashboard reads
BUFFER = 256 * 1024


@dataclass(frozen=True)
class Target:
    name: str  # dashboard | client | gcs
    host: str
    port: int


class PortInUse(RaybridgeError):
    pass


def check_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise PortInUse(f"local port {port} is in use (choose another with --local-port)") from None


class Forwarder:
    """Forward local ports to targets over SSH; reconnect and re-resolve targets when the link drops.

    connect() returns a fresh SSHClient; resolve(client) returns {name: Target} for the current head.
    """

    def __init__(
        self,
        connect: Callable[[], paramiko.SSHClient],
        resolve: Callable[[paramiko.SSHClient], dict[str, Target]],
        local_ports: dict[str, int],
        token: str | None = None,
        log: Callable[[str], None] = lambda m: None,
        bind: str = "127.0.0.1",
    ):
        self._connect = connect
        self._resolve = resolve
        self.local_ports = dict(local_ports)
        self.token = token
        self.nonce = secrets.token_urlsafe(16)
        self.log = log
        self.bind = bind
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self.targets: dict[str, Target] = {}
        self._servers: list[socket.socket] = []
        self._stop = threading.Event()
        self.reconnects = 0

    # ------------------------------------------------------------ connection

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            t = self._client.get_transport() if self._client else None
            if t is not None and t.is_active():
                return t
            delay = 0.25
            while not self._stop.is_set():
                try:
                    if self._client is not None:
                        with contextlib.suppress(Exception):
                            self._client.close()
                        self.log("SSH connection lost; reconnecting")
                    client = self._connect()
                    targets = self._resolve(client)
                except RaybridgeError as e:
                    if self._client is None:
                        raise  # first connection: report, don't retry
                    self.log(f"reconnect failed ({e}); retrying in {delay:.1f}s")
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10)
                    continue
                if self._client is not None:
                    self.reconnects += 1
                    moved = [n for n, t in targets.items() if self.targets.get(n) != t]
                    self.log("reconnected" + (f"; head moved to {targets[moved[0]].host}" if moved else ""))
                self._client, self.targets = client, targets
                transport = client.get_transport()
                transport.set_keepalive(5)
                return transport
            raise RaybridgeError("tunnel stopped")

    # ------------------------------------------------------------ serving

    def start(self) -> None:
        self._transport()
        for name, port in self.local_ports.items():
            if name not in self.targets:
                raise RaybridgeError(f"the cluster has no {name} port")
            check_free(port, self.bind)
        for name, port in self.local_ports.items():
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((self.bind, port))
            srv.listen(64)
            self.local_ports[name] = srv.getsockname()[1]
            self._servers.append(srv)
            threading.Thread(target=self._accept, args=(srv, name), daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """Notice a dead link even while idle, so the next request does not wait for it."""
        while not self._stop.wait(1.0):
            with contextlib.suppress(RaybridgeError):
                self._transport()

    def stop(self) -> None:
        self._stop.set()
        for s in self._servers:
            with contextlib.suppress(OSError):
                s.close()
        if self._client:
            self._client.close()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def _accept(self, srv: socket.socket, name: str) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer, name), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int], name: str) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            if name == "dashboard" and self.token and self._maybe_login(conn):
                return
            chan = None
            for attempt in range(2):  # a second try after a reconnect
                try:
                    target = self.targets[name]
                    chan = self._transport().open_channel(
                        "direct-tcpip", (target.host, target.port), peer, timeout=10
                    )
                    break
                except paramiko.ChannelException as e:
                    self.log(
                        f"{name} at {self.targets[name].host}:{self.targets[name].port} refused: {e.text}"
                    )
                    return
                except (paramiko.SSHException, OSError, EOFError):
                    if attempt:
                        return
                    with self._lock:
                        if self._client:
                            self._client.close()  # force a reconnect
                except RaybridgeError:
                    return
            if chan is None:
                return
            with chan:
                pump(conn, chan)

    def _maybe_login(self, conn: socket.socket) -> bool:
        conn.settimeout(2)
        try:
            head = conn.recv(4096, socket.MSG_PEEK)
        except OSError:
            return False
        finally:
            conn.settimeout(None)
        if not head.startswith(f"GET /raybridge/login/{self.nonce} ".encode()):
            return False
        conn.recv(len(head))
        cookie = f"{COOKIE}={self.token}; Path=/; SameSite=Strict; Max-Age=2592000"
        conn.sendall(
            f"HTTP/1.1 302 Found\r\nSet-Cookie: {cookie}\r\nLocation: /\r\nContent-Length: 0\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
        )
        return True

    def login_url(self) -> str:
        return login_url(self.local_ports["dashboard"], self.nonce)


def login_url(port: int, nonce: str) -> str:
    """The one-time address that signs a browser in (see Forwarder._maybe_login)."""
    return f"http://127.0.0.1:{port}/raybridge/login/{nonce}"


def pump(sock: socket.socket, chan: paramiko.Channel) -> None:
    """Copy bytes both ways until either side closes."""
    while True:
        r, _, _ = select.select([sock, chan], [], [], 30)
        if sock in r:
            data = sock.recv(BUFFER)
            if not data:
                chan.shutdown_write()
                drain(chan, sock)
                return
            chan.sendall(data)
        if chan in r:
            data = chan.recv(BUFFER)
            if not data:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                drain_sock(sock, chan)
                return
            sock.sendall(data)
        if chan.closed:
            return


def drain(chan: paramiko.Channel, sock: socket.socket) -> None:
    while True:
        data = chan.recv(BUFFER)
        if not data:
            return
        sock.sendall(data)


def drain_sock(sock: socket.socket, chan: paramiko.Channel) -> None:
    sock.settimeout(5)
    with contextlib.suppress(OSError):
        while data := sock.recv(BUFFER):
            chan.sendall(data)
