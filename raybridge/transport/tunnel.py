"""Local ports forwarded through the login node to the Ray head (paramiko direct-tcpip).

One SSH connection carries every forwarded connection. If it drops, the forwarder reconnects with
backoff. It re-reads the cluster record every few seconds, after a reconnect and when the head refuses
a connection, so it follows a requeued job: a new auth token, and a new head if the job landed elsewhere.
The dashboard port can also sign a browser in: GET /raybridge/login/<nonce> answers with a session
cookie of this tunnel and a redirect, so nobody copies tokens by hand. The link works once, within
LINK_TTL_S of being issued, and only with a loopback Host header. The cookie is a random value, not the Ray
token: a browser sends cookies to every port of 127.0.0.1 (cookies are scoped by host, not port), so another
local user's server, or whoever binds the port after the tunnel stops, would receive it. The tunnel swaps a
valid session cookie for the `Authorization` header itself, request by request (`Connection: close`, so
each request passes here), and the Ray token never reaches the browser. The cookie is HttpOnly and lives as
long as the browser session. A new link is issued on request (SIGUSR1 to a background tunnel:
`raybridge tunnel --login-link JOB`) and when the cluster restarts with a new token, which also ends the
browsers' sessions.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import paramiko

from raybridge.errors import RaybridgeError

COOKIE = "raybridge-session"  # this tunnel's browser session (never the Ray token)
BUFFER = 256 * 1024


@dataclass(frozen=True)
class Target:
    name: str  # dashboard | client | gcs
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    """Where the forwarded ports lead now, and the token that cluster accepts (None: no auth)."""

    targets: dict[str, Target]
    token: str | None = None


REFRESH_S = 5.0
LINK_TTL_S = 300.0
LOGIN = re.compile(
    rb"GET /raybridge/login/([A-Za-z0-9_-]{1,64})(?:\?next=([A-Za-z0-9%/._~-]{0,200}))? HTTP/1\.[01]\r\n"
)
LOOPBACK_HOST = re.compile(rb"\r\nhost: *(127\.0\.0\.1|localhost|\[::1\])(:\d+)?\r\n", re.IGNORECASE)


class SignIn:
    """The one-time browser sign-in link of a tunnel: single use, short-lived."""

    def __init__(self, ttl: float = LINK_TTL_S):
        self.ttl = ttl
        self._lock = threading.Lock()
        self.sessions: set[str] = set()
        self.renew()

    def renew(self) -> str:
        with self._lock:
            self.nonce = secrets.token_urlsafe(16)
            self.issued = time.monotonic()
            self.used = False
            return self.nonce

    def redeem(self, nonce: bytes) -> str | None:
        """A new browser session, once for the current nonce, within its lifetime (constant-time
        comparison); None otherwise."""
        with self._lock:
            fresh = not self.used and time.monotonic() - self.issued <= self.ttl
            if hmac.compare_digest(nonce, self.nonce.encode()) and fresh:
                self.used = True
                session = secrets.token_urlsafe(32)
                self.sessions.add(session)
                return session
            return None

    def valid(self, session: bytes) -> bool:
        with self._lock:
            return any(hmac.compare_digest(session, s.encode()) for s in self.sessions)

    def end_sessions(self) -> None:
        with self._lock:
            self.sessions.clear()


class PortInUse(RaybridgeError):
    pass


def check_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket() as s:
        # As the real listener does: connections of an earlier tunnel in TIME_WAIT do not make the
        # port busy, a listening socket does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            raise PortInUse(f"local port {port} is in use (choose another with --local-port)") from None


class Forwarder:
    """Forward local ports to targets over SSH; reconnect and re-resolve targets when the link drops.

    connect() returns a fresh SSHClient; resolve(client) returns the Route to the current head (it
    raises RaybridgeError while there is none, e.g. a requeued job not running yet).
    """

    def __init__(
        self,
        connect: Callable[[], paramiko.SSHClient],
        resolve: Callable[[paramiko.SSHClient], Route],
        local_ports: dict[str, int],
        log: Callable[[str], None] = lambda m: None,
        bind: str = "127.0.0.1",
    ):
        self._connect = connect
        self._resolve = resolve
        self.local_ports = dict(local_ports)
        self.sign_in = SignIn()
        self.on_new_link: Callable[[str], None] = lambda url: None  # e.g. rewrite a background record
        self.log = log
        self.bind = bind
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self.route = Route({})
        self._servers: list[socket.socket] = []
        self._stop = threading.Event()
        self._last_error: str | None = None
        self.reconnects = 0

    @property
    def targets(self) -> dict[str, Target]:
        return self.route.targets

    @property
    def token(self) -> str | None:
        return self.route.token

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
                    route = self._resolve(client)
                except RaybridgeError as e:
                    if self._client is None:
                        raise  # first connection: report, don't retry
                    self.log(f"reconnect failed ({e}); retrying in {delay:.1f}s")
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10)
                    continue
                if self._client is not None:
                    self.reconnects += 1
                    self.log("reconnected")
                self._client = client
                self._set_route(route)
                transport = client.get_transport()
                transport.set_keepalive(5)
                return transport
            raise RaybridgeError("tunnel stopped")

    def _set_route(self, route: Route) -> None:
        old, self.route = self.route, route
        if old.targets and route.targets != old.targets:
            head = next(iter(route.targets.values()))
            self.log(f"the head moved to {head.host}; forwarding there")
        if old.token and route.token != old.token:
            self.log("the cluster restarted with a new auth token; using it")
            self.sign_in.end_sessions()
            self.log(f"browsers sign in again with {self.renew_login()}")

    def refresh(self) -> None:
        """Re-read the route over the current connection (a requeued job has a new token and
        maybe a new head). Keeps the last route while there is no cluster to lead to."""
        with self._lock:
            client = self._client
        if client is None:
            return
        try:  # not under the lock: forwarding goes on meanwhile
            route = self._resolve(client)
        except RaybridgeError as e:
            if str(e) != self._last_error:
                self.log(f"{e}; waiting for the cluster")
            self._last_error = str(e)
            return
        with self._lock:
            if self._last_error:
                self.log("the cluster is ready again")
            self._last_error = None
            self._set_route(route)

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
        """Notice a dead link even while idle, so the next request does not wait for it; re-read
        the route every REFRESH_S."""
        last = time.monotonic()
        while not self._stop.wait(1.0):
            with contextlib.suppress(RaybridgeError):
                self._transport()
            if time.monotonic() - last >= REFRESH_S:
                last = time.monotonic()
                self.refresh()

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
            first = b""  # a browser's request head, with the token added (Forwarder.authorize)
            if name == "dashboard" and self.token:
                head = peek_headers(conn)
                if self._maybe_login(conn, head):
                    return
                first = self.authorize(conn, head)
            chan = None
            for attempt in range(2):  # a second try after a reconnect or a moved head
                target = self.targets.get(name)
                if target is None:
                    return
                try:
                    chan = self._transport().open_channel(
                        "direct-tcpip", (target.host, target.port), peer, timeout=10
                    )
                    break
                except paramiko.ChannelException as e:
                    self.log(f"{name} at {target.host}:{target.port} refused: {e.text}")
                    if attempt:
                        return
                    self.refresh()  # a requeued job may have its head elsewhere now
                    if self.targets.get(name) == target:
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
                if first:
                    chan.sendall(first)
                pump(conn, chan)

    def _maybe_login(self, conn: socket.socket, head: bytes | None = None) -> bool:
        """Answer a sign-in request (True), or leave the connection to the dashboard (False)."""
        head = peek_headers(conn) if head is None else head
        m = LOGIN.match(head)
        if not m:
            return False
        conn.recv(len(head))
        # Only a browser on this machine, addressing the tunnel by a loopback name (no DNS rebinding).
        session = self.sign_in.redeem(m.group(1)) if LOOPBACK_HOST.search(head) else None
        if session is None:
            conn.sendall(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n"
                b"Connection: close\r\n\r\n"
                + b"sign-in link used or expired: raybridge tunnel --login-link JOB\n".ljust(64)
            )
            return True
        # HttpOnly: scripts of other pages served on 127.0.0.1 cannot read it; no Max-Age: it ends
        # with the browser session.
        cookie = f"{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict"
        conn.sendall(
            f"HTTP/1.1 302 Found\r\nSet-Cookie: {cookie}\r\nLocation: {next_page(m.group(2))}\r\n"
            "Content-Length: 0\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
        )
        return True

    def authorize(self, conn: socket.socket, head: bytes) -> bytes:
        """For a request that carries a valid session cookie: read its head off the connection and
        return it with the cookie taken out and `Authorization: Bearer <token>` put in (and
        `Connection: close`, so the browser's next request comes through here too). Any other
        request is left as it is, unread (b"")."""
        end = head.find(b"\r\n\r\n")
        token = self.token
        if end < 0 or not token:
            return b""
        lines, signed_in, upgrade = [], False, False
        for line in head[:end].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"cookie":
                others = []
                for part in value.split(b";"):
                    name, _, val = part.strip().partition(b"=")
                    if name == COOKIE.encode():
                        signed_in = signed_in or self.sign_in.valid(val)
                    elif part.strip():
                        others.append(part.strip())
                if others:
                    lines.append(b"Cookie: " + b"; ".join(others))
                continue
            if key == b"authorization":
                continue  # the tunnel's own goes in below
            if key == b"connection":
                upgrade = b"upgrade" in value.lower()  # a WebSocket: kept open, as asked
                if not upgrade:
                    continue
            lines.append(line)
        if not signed_in:
            return b""
        taken = b""
        while len(taken) < end + 4:
            chunk = conn.recv(end + 4 - len(taken))
            if not chunk:
                return b""
            taken += chunk
        lines.append(b"Authorization: Bearer " + token.encode())
        if not upgrade:
            lines.append(b"Connection: close")
        return b"\r\n".join([head.split(b"\r\n", 1)[0], *lines]) + b"\r\n\r\n"

    @property
    def nonce(self) -> str:
        return self.sign_in.nonce

    def renew_login(self) -> str:
        """A fresh one-time link (the previous one stops working)."""
        self.sign_in.renew()
        url = self.login_url()
        self.on_new_link(url)
        return url

    def login_url(self) -> str:
        return login_url(self.local_ports["dashboard"], self.nonce)


def peek_headers(conn: socket.socket, limit: int = 8192, timeout: float = 2.0) -> bytes:
    """The request's head without consuming it (the dashboard may still get it): peek until the
    blank line that ends the headers, `limit` bytes, or `timeout` (a request can arrive in pieces)."""
    deadline = time.monotonic() + timeout
    head = b""
    try:
        while b"\r\n\r\n" not in head and len(head) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(left)
            more = conn.recv(limit, socket.MSG_PEEK)
            if len(more) == len(head):  # nothing new yet (or the peer closed)
                if not more:
                    break
                time.sleep(0.005)
            head = more
    except OSError:
        pass
    finally:
        conn.settimeout(None)
    return head


def next_page(raw: bytes | None) -> str:
    """Where a signed-in browser goes: a page of this dashboard (a path, never another site, and nothing
    that would end the Location header: no control characters or spaces once decoded)."""
    page = unquote(raw.decode()) if raw else "/"
    plain = page.isprintable() and " " not in page
    return page if plain and page.startswith("/") and not page.startswith("//") and "\\" not in page else "/"


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
