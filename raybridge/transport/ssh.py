"""The SSH half of the runners: reach the login node over one persistent connection (SSHRunner), with
~/.ssh/config (aliases, ports, keys, ProxyJump), known_hosts checking and bounded SFTP."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from raybridge.errors import CommandError, HostKeyError, SSHError
from raybridge.transport.openssh import GLOBAL_KNOWN_HOSTS, BulkRanges
from raybridge.transport.runner import LoginSpec, Result
from raybridge.transport.transfer import dd_argv

# Throughput (scripts/bench-tunnel): paramiko decrypts every packet in Python, so fewer, larger packets
# and one-pass AEAD ciphers matter. AES-GCM (one call per packet) before AES-CTR + HMAC (two); the
# server may send us up to 128 KiB per packet (OpenSSH's own limit is 256 KiB); a 4 MiB window keeps
# the link busy without letting paramiko's channel buffer, which shifts its contents on every read, grow.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
WINDOW = 4 << 20
MAX_PACKET = 128 << 10
REOPEN_S = 2.0  # how stale a followed file may look on an NFS login node, at most

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSHTarget:
    """A login destination after applying ~/.ssh/config (aliases, ports, keys, ProxyJump)."""

    hostname: str
    user: str
    port: int
    identity_files: tuple[str, ...]
    known_hosts: str
    proxy_jump: str | None
    accept_new_host_key: bool
    ssh_config: str | None = None

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}" + (f":{self.port}" if self.port != 22 else "")


def resolve_target(login: LoginSpec) -> SSHTarget:
    config_path = Path(login.ssh_config or "~/.ssh/config").expanduser()
    cfg = paramiko.SSHConfig()
    if config_path.is_file():
        try:
            cfg = paramiko.SSHConfig.from_path(str(config_path))
        except Exception as e:  # paramiko raises several types for bad configs
            raise SSHError(f"cannot parse SSH config {config_path}: {e}") from None
    entry = cfg.lookup(login.host)
    known = login.known_hosts or (entry.get("userknownhostsfile") or "~/.ssh/known_hosts").split()[0]
    ids = (login.identity_file,) if login.identity_file else tuple(entry.get("identityfile", []))
    return SSHTarget(
        hostname=entry.get("hostname", login.host),
        user=login.user or entry.get("user") or os.environ.get("USER", "root"),
        port=login.port or int(entry.get("port", 22)),
        identity_files=tuple(str(Path(i).expanduser()) for i in ids),
        known_hosts=str(Path(known).expanduser()),
        proxy_jump=jump
        if (jump := login.proxy_jump or entry.get("proxyjump")) not in (None, "none")
        else None,
        accept_new_host_key=login.accept_new_host_key,
        ssh_config=login.ssh_config,
    )


def parse_jump(hop: str) -> tuple[str, str | None, int | None]:
    """One ProxyJump hop, `[user@]host[:port]` or `ssh://[user@]host[:port]` → (host, user, port)."""
    hop = hop.strip().removeprefix("ssh://")
    user, _, hostport = hop.rpartition("@")
    host, port = hostport, None
    if hostport.startswith("["):  # [v6addr]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    if not host or (port is not None and not port.isdigit()):
        raise SSHError(f"cannot parse ProxyJump hop {hop!r} (expected [user@]host[:port])")
    return host, user or None, int(port) if port else None


def jump_targets(target: SSHTarget) -> list[SSHTarget]:
    """The hops of target's ProxyJump, in order; each resolved through the same SSH config (aliases,
    users, keys). A hop without its own key uses the target's key files, then the agent/default keys."""
    hops = []
    for hop in (target.proxy_jump or "").split(","):
        if not hop.strip():
            continue
        host, user, port = parse_jump(hop)
        t = resolve_target(
            LoginSpec(
                host=host,
                user=user,
                port=port,
                ssh_config=target.ssh_config,
                known_hosts=target.known_hosts,
                accept_new_host_key=target.accept_new_host_key,
            )
        )
        # A hop's own ProxyJump is ignored: the chain is the target's list (as OpenSSH does with -J a,b).
        hops.append(
            dataclasses.replace(t, identity_files=t.identity_files or target.identity_files, proxy_jump=None)
        )
    return hops


class Client(paramiko.SSHClient):
    """An SSH client that also closes the jump-host connections it runs through."""

    def __init__(self) -> None:
        super().__init__()
        self.jump_clients: list[paramiko.SSHClient] = []

    def close(self) -> None:
        super().close()
        for hop in reversed(self.jump_clients):
            hop.close()


class KnownHosts:
    """A known_hosts file as OpenSSH reads it: host keys, `@revoked` keys (never trusted, even when
    listed as a host's key), `@cert-authority` lines (host certificates are not supported: such lines
    are skipped, and a host known only through them is unknown), comments and key types paramiko
    does not know (skipped, kept in the file)."""

    def __init__(self, *paths: str):
        self.keys = paramiko.HostKeys()
        self.revoked: set[str] = set()  # base64 blobs
        self.cert_authorities = 0
        entries: list[tuple[list[str], paramiko.PKey]] = []
        for path in paths:
            try:
                lines = Path(path).read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                words = line.split()
                if not words or words[0].startswith("#"):
                    continue
                if words[0] == "@revoked" and len(words) >= 4:
                    self.revoked.add(words[3])
                    continue
                if words[0].startswith("@"):
                    self.cert_authorities += words[0] == "@cert-authority"
                    continue
                try:
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
                except Exception:  # a key type or format paramiko does not read
                    entry = None
                if entry is not None and entry.key is not None:
                    entries.append((entry.hostnames, entry.key))
        for names, key in entries:
            if key.get_base64() not in self.revoked:
                for name in names:
                    self.keys.add(name, key.get_name(), key)


class CheckedPolicy(paramiko.MissingHostKeyPolicy):
    """A host whose key is not known: refused, or with accept_new recorded by appending one line
    to known_hosts (the rest of the file is left as it is). A revoked key is always refused."""

    def __init__(self, known: KnownHosts, path: str, accept_new: bool):
        self.known, self.path, self.accept_new = known, path, accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if key.get_base64() in self.known.revoked:
            raise HostKeyError(
                f"the host key of {hostname} is marked @revoked in {self.path}: refusing to connect"
            )
        if not self.accept_new:
            hint = " (host certificates, @cert-authority, are not supported: add the host's own key)"
            raise paramiko.SSHException(
                f"Server {hostname!r} not found in known_hosts"
                + (hint if self.known.cert_authorities else "")
            )
        known = Path(self.path)
        known.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(known, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            if known.stat().st_size and not known.read_bytes().endswith(b"\n"):
                f.write("\n")
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def warn_open_keys(files: tuple[str, ...]) -> None:
    """OpenSSH refuses a private key that others can read; say so at least."""
    for f in files:
        try:
            mode = os.stat(Path(f).expanduser()).st_mode
        except OSError:
            continue
        if mode & 0o077:
            log.warning(
                f"warning: private key {f} is readable by others (mode {mode & 0o777:o}): chmod 600 it"
            )


def fast_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A Transport that prefers the ciphers paramiko runs fastest (the server picks from our list in
    our order; every other cipher stays available), with a larger window and packet size."""
    t = paramiko.Transport(sock, default_window_size=WINDOW, default_max_packet_size=MAX_PACKET, **kwargs)
    opts = t.get_security_options()
    fast = [c for c in FAST_CIPHERS if c in opts.ciphers]
    opts.ciphers = tuple(fast + [c for c in opts.ciphers if c not in fast])
    return t


def connect(target: SSHTarget, timeout: float = 15, sock: Any = None) -> paramiko.SSHClient:
    """One SSH connection with host-key checking against known_hosts (unknown key = refused,
    unless accept_new_host_key, which records it like OpenSSH's StrictHostKeyChecking=accept-new)."""
    client = Client()
    # As OpenSSH: the user's file (the profile's, ssh_config's UserKnownHostsFile, or ~/.ssh/known_hosts)
    # replaces ~/.ssh/known_hosts rather than adding to it; the site-wide file is read too.
    known = KnownHosts(GLOBAL_KNOWN_HOSTS, target.known_hosts)
    for hostname, keys in known.keys.items():
        for key in keys.values():
            client.get_host_keys().add(hostname, key.get_name(), key)
    client.set_missing_host_key_policy(CheckedPolicy(known, target.known_hosts, target.accept_new_host_key))
    warn_open_keys(target.identity_files)
    hops: list[paramiko.SSHClient] = []
    for hop, nxt in itertools.pairwise([*jump_targets(target), target]):
        hop_client = connect(hop, timeout, sock=sock)
        hops.append(hop_client)
        try:
            sock = hop_client.get_transport().open_channel(
                "direct-tcpip", (nxt.hostname, nxt.port), ("127.0.0.1", 0), timeout=timeout
            )
        except (paramiko.SSHException, OSError) as e:
            for c in hops:
                c.close()
            raise SSHError(
                f"jump host {hop.label} cannot reach {nxt.label}: {e or type(e).__name__}"
            ) from None
    client.jump_clients = hops  # kept open as long as this connection, closed with it
    try:
        client.connect(
            target.hostname,
            port=target.port,
            username=target.user,
            key_filename=list(target.identity_files) or None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            sock=sock,
            allow_agent=True,
            look_for_keys=not target.identity_files,
            transport_factory=fast_transport,
        )
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException:
        raise HostKeyError(
            f"host key of {target.label} does not match {target.known_hosts}: refusing to connect "
            "(the key changed, or someone is intercepting the connection)"
        ) from None
    except paramiko.SSHException as e:
        if "not found in known_hosts" in str(e):
            hint = (
                " (host certificates, @cert-authority, are not supported)"
                if "cert-authority" in str(e)
                else ""
            )
            raise HostKeyError(
                f"host key of {target.label} is not in {target.known_hosts}: refusing to connect "
                f"(verify it and add it, or pass --accept-new-host-key once){hint}"
            ) from None
        if isinstance(e, paramiko.AuthenticationException):
            raise SSHError(
                f"authentication to {target.label} failed (keys tried: "
                f"{', '.join(target.identity_files) or 'agent/default keys'})"
            ) from None
        raise SSHError(f"SSH to {target.label} failed: {e}") from None
    except (TimeoutError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError) and e.errors:
            first = next(iter(e.errors.values()))
            reason = getattr(first, "strerror", None) or str(first)
        raise SSHError(f"cannot reach login host {target.label}: {reason}") from None
    sock = client.get_transport().sock
    if isinstance(sock, socket.socket):
        # Small request/response traffic (commands, forwarded HTTP) must not wait for delayed ACKs.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def open_sftp(client: paramiko.SSHClient, timeout: float = 10) -> paramiko.SFTPClient:
    """SFTP over the client's connection, every step bounded by timeout (paramiko's own
    open_sftp may wait an hour on a link that died without closing)."""
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise paramiko.SSHException("the SSH connection is closed")
    chan = transport.open_session(timeout=timeout)
    chan.settimeout(timeout)
    chan.invoke_subsystem("sftp")
    return paramiko.SFTPClient(chan)


class SSHRunner:
    """Runs commands on the login node over one persistent connection; files go over SFTP."""

    def __init__(self, login: LoginSpec, timeout: float = 15):
        self.target = resolve_target(login)
        self.host = self.target.label
        self.client = connect(self.target, timeout)
        self._sftp: paramiko.SFTPClient | None = None
        self._reading: dict[str, tuple[paramiko.SFTPFile, float]] = {}  # path -> (open file, opened at)

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = open_sftp(self.client, timeout=60)
            except (paramiko.SSHException, OSError) as e:
                raise SSHError(f"SFTP to {self.host} failed (is the sftp subsystem enabled?): {e}") from None
        return self._sftp

    def run(
        self,
        argv: list[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = 60,
        env: dict[str, str] | None = None,
    ) -> Result:
        command = shlex.join(argv)
        if env:  # `env` on the far side: servers usually refuse SSH environment requests
            command = shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv])
        try:
            stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            if input is not None:
                stdin.write(input)
            stdin.channel.shutdown_write()
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            rc = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError) as e:
            raise SSHError(f"lost the SSH connection to {self.host}: {e or type(e).__name__}") from None
        if rc == -1:
            rc = 255
        result = Result(argv, rc, out, err)
        if check and rc != 0:
            raise CommandError(argv, rc, out, err, host=self.host)
        return result

    def read_text(self, path: str) -> str | None:
        try:
            with self.sftp.open(path, "r") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            if getattr(e, "errno", None) == 2:
                return None
            raise SSHError(f"cannot read {path} on {self.host}: {e}") from None

    def read_from(self, path: str, offset: int, size: int) -> bytes | None:
        """One SFTP request per call on a file kept open (a log followed a few times a second),
        reopened every few seconds: an NFS client sees other nodes' appends at open time."""
        f, opened = self._reading.get(path, (None, 0.0))
        try:
            if f is None or time.monotonic() - opened > REOPEN_S:
                if f is not None:
                    f.close()
                f = self.sftp.open(path, "rb")
                self._reading[path] = (f, time.monotonic())
            f.seek(offset)
            return f.read(size)
        except OSError as e:
            self._reading.pop(path, None)
            if isinstance(e, FileNotFoundError) or getattr(e, "errno", None) == 2:
                return None
            raise SSHError(f"cannot read {path} on {self.host}: {e}") from None
        except paramiko.SSHException as e:
            self._reading.pop(path, None)
            raise SSHError(f"lost the SSH connection to {self.host}: {e}") from None

    def write_text(self, path: str, text: str, mode: int = 0o600) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with self.sftp.open(tmp, "w") as f:
            f.chmod(mode)
            f.write(text.encode())
        self.sftp.posix_rename(tmp, path)

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        self.run(["mkdir", "-p", "-m", oct(mode)[2:], path])

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(self.sftp.listdir(path))
        except OSError:
            return []

    def get(self, path: str, local: str, callback: Callable[[int, int], None] | None = None) -> None:
        try:
            self.sftp.get(path, local, callback=callback)
        except OSError as e:
            raise SSHError(f"cannot copy {path} from {self.host}: {e}") from None

    def range_reader(self) -> BulkRanges:
        """The user's OpenSSH client for the bytes where it can reach the login node, paramiko otherwise."""
        return BulkRanges(self.target, lambda: SSHRanges(self.target))

    def home(self) -> str:
        return self.sftp.normalize(".")

    def connect_tcp(self, ip: str, port: int, timeout: float = 5) -> paramiko.Channel:
        """A direct-tcpip channel: the login node connects to ip:port for us."""
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHError(f"the SSH connection to {self.host} is closed")
        try:
            chan = transport.open_channel("direct-tcpip", (ip, port), ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError) as e:
            raise OSError(f"{ip}:{port} via {self.host}: {e}") from None
        chan.settimeout(timeout)
        return chan

    def close(self) -> None:
        for f, _ in self._reading.values():
            with contextlib.suppress(Exception):
                f.close()
        self._reading.clear()
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()


class SSHRanges:
    """Byte ranges of files on the login node, over a connection of its own (one parallel stream):
    `dd` streams the range over an exec channel, plain channel data with no per-request round trips
    (SFTP, when the login node's dd lacks GNU's byte flags). A connection carries at most BUDGET bytes,
    then the next range opens a new one: paramiko renegotiates keys after 512 MiB, and a channel that
    the server closes during that renegotiation stalls the connection."""

    BUDGET = 384 << 20

    def __init__(self, target: SSHTarget):
        self.target = target
        self.client: paramiko.SSHClient | None = None
        self.carried = 0
        self.dd = True

    def _client(self, length: int) -> paramiko.SSHClient:
        if self.client is None or self.carried + length > self.BUDGET:
            self.close()
            self.client, self.carried = connect(self.target), 0
        self.carried += length
        return self.client

    def read(self, path: str, offset: int, length: int, sink: Callable[[bytes], None]) -> None:
        client = self._client(length)
        if self.dd and self._read_dd(client, path, offset, length, sink):
            return
        self.dd = False
        try:
            with client.open_sftp() as sftp, sftp.open(path, "rb") as f:
                step = 1 << 20
                for data in f.readv(
                    [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]
                ):
                    sink(data)
        except (OSError, paramiko.SSHException) as e:
            raise SSHError(f"cannot copy {path} from {self.target.label}: {e}") from None

    def _read_dd(
        self, client: paramiko.SSHClient, path: str, offset: int, length: int, sink: Callable[[bytes], None]
    ) -> bool:
        """False (nothing handed to sink) when dd does not know the flags; raises on other failures."""
        argv = dd_argv(path, offset, length)
        got = 0
        try:
            chan = client.get_transport().open_session(timeout=30)
            with chan:
                chan.exec_command(shlex.join(argv))
                while data := chan.recv(1 << 20):
                    got += len(data)
                    sink(data)
                rc = chan.recv_exit_status()
                err = chan.recv_stderr(4096).decode(errors="replace").strip()
        except (OSError, paramiko.SSHException) as e:
            raise SSHError(
                f"lost the SSH connection to {self.target.label} while copying {path}: {e}"
            ) from None
        if rc != 0 and got == 0 and ("flag" in err or "operand" in err):
            return False
        if rc != 0 or got != length:
            raise SSHError(
                f"cannot copy {path} from {self.target.label}: {err or f'{got} of {length} bytes'}"
            )
        return True

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
