"""Bulk byte ranges through the user's own OpenSSH client, where it exists (checkpoint pulls).

paramiko decrypts every packet in Python, under one interpreter lock: a few streams of it are bound by
one core. `ssh` decrypts in C, one process per stream, so parallel streams use as many cores as the
machine has. paramiko keeps the control connection (commands, listings, SFTP, tunnels); this module
carries only the bytes of `dd` ranges, which the caller hashes as they land and checks against the
source's sha256 — integrity never depends on which client carried them.

The same rules as the paramiko connection: the target as raybridge resolved it (host, port, user, key
files), the user's known_hosts file and the site-wide one, strict host-key checking (the control
connection has already checked or recorded the key), no prompts (BatchMode), no user config file
(-F none: nothing in it can change where the bytes come from). A target behind ProxyJump, an `ssh`
that refuses to connect (exit 255 before any byte), or RAYBRIDGE_PULL_CLIENT=paramiko: paramiko for the
rest of the copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from raybridge.errors import SSHError
from raybridge.transport.transfer import dd_argv

log = logging.getLogger(__name__)

GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
READ = 4 << 20  # bytes handed to the sink at a time
PIPE_SIZE = 1 << 20  # Linux's default limit for an unprivileged process
MASTER_WAIT_S = 20.0  # connect + authenticate, at most


class Unavailable(SSHError):
    """ssh could not connect (exit 255, no byte arrived): use paramiko instead."""


def ssh_argv(target: Any, ssh: str, control: str, *, master: bool = False) -> list[str]:
    """`ssh` options for target (a resolved SSHTarget): the master connection (master=True, no
    command) or a session multiplexed over it through the control socket."""
    argv = [ssh, "-F", "none", "-T", "-x", "-a", "-p", str(target.port), "-l", target.user, "-S", control]
    opts = ["ControlMaster=yes", "ControlPersist=no"] if master else ["ControlMaster=no"]
    opts += [
        # AES-GCM first where the CPU has AES instructions (as the paramiko connection prefers it);
        # every other cipher stays allowed.
        "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        f"UserKnownHostsFile={target.known_hosts}",
        f"GlobalKnownHostsFile={GLOBAL_KNOWN_HOSTS}",
        "ConnectTimeout=15",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
        "LogLevel=ERROR",
    ]
    for opt in opts:
        argv += ["-o", opt]
    for key in target.identity_files:
        argv += ["-i", key]
    # The master's own session is a `cat` of a pipe this process holds: when this process ends, however
    # it ends, the pipe closes, cat ends, and the master with it (no -N master left connected).
    return [*argv, target.hostname, "cat"] if master else [*argv, target.hostname]


CLIENT_VAR = "RAYBRIDGE_PULL_CLIENT"  # "paramiko": never use ssh for the bytes


def usable(target: Any) -> str | None:
    """The path of `ssh` when this target can be reached with it, else None."""
    if target.proxy_jump or os.environ.get(CLIENT_VAR) == "paramiko":
        return None
    return shutil.which("ssh")


class BulkRanges:
    """A RangeReader (transfer.py): `dd` of one range on the login node, its stdout read from `ssh`;
    paramiko's reader (fallback()) when ssh is not usable here.

    One OpenSSH connection per stream, held by a master `ssh` that is this process's child (no
    ControlPersist daemon; it ends with this process, see ssh_argv); each range is a session multiplexed over it,
    through a control socket in a private temporary folder. A new connection per range would cost a
    key exchange and authentication (~0.25 s) for every 64 MiB."""

    def __init__(self, target: Any, fallback: Callable[[], Any]):
        self.target = target
        self.ssh = usable(target)
        self.fallback_factory = fallback
        self.fallback: Any = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.master: subprocess.Popen[bytes] | None = None
        self.folder: str | None = None

    def read(self, path: str, offset: int, length: int, sink: Callable[[bytes | memoryview], None]) -> None:
        if self.ssh is not None:  # None from the start, or since ssh could not connect
            try:
                self._read_ssh(path, offset, length, sink)
                return
            except Unavailable as e:
                log.info("OpenSSH stream unavailable (%s); using paramiko", e)
                self.ssh = None
                self._stop_master()
        if self.fallback is None:
            self.fallback = self.fallback_factory()
        self.fallback.read(path, offset, length, sink)

    @property
    def control(self) -> str:
        return os.path.join(self.folder or "", "ctl")

    def _start_master(self) -> None:
        if self.master is not None and self.master.poll() is None:
            return
        self._stop_master()
        self.folder = tempfile.mkdtemp(prefix="rb-ssh-")  # 0700: only this user reaches the socket
        self.master = subprocess.Popen(
            ssh_argv(self.target, self.ssh or "ssh", self.control, master=True),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + MASTER_WAIT_S
        while not os.path.exists(self.control):
            if self.master.poll() is not None or time.monotonic() > deadline:
                err = b""
                with contextlib.suppress(Exception):
                    if self.master.poll() is not None and self.master.stderr:
                        err = self.master.stderr.read()
                self._stop_master()
                why = err.decode(errors="replace").strip().splitlines() or ["no connection"]
                raise Unavailable(why[-1][:200])
            time.sleep(0.02)

    def _stop_master(self) -> None:
        master, self.master = self.master, None
        if master is not None:
            if master.stdin:
                with contextlib.suppress(OSError):
                    master.stdin.close()  # cat ends, then the master
            with contextlib.suppress(subprocess.TimeoutExpired):
                master.wait(timeout=2)
            if master.poll() is None:
                master.terminate()
            with contextlib.suppress(Exception):
                master.wait(timeout=5)
            if master.poll() is None:
                master.kill()
                master.wait()
            if master.stderr:
                master.stderr.close()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _read_ssh(
        self, path: str, offset: int, length: int, sink: Callable[[bytes | memoryview], None]
    ) -> None:
        self._start_master()
        argv = [
            *ssh_argv(self.target, self.ssh or "ssh", self.control),
            shlex.join(dd_argv(path, offset, length)),
        ]
        got = 0
        self.proc = proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            with contextlib.suppress(OSError, AttributeError):  # a pipe holds 64 KiB by default
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            buf = bytearray(READ)
            view = memoryview(buf)
            while True:
                # Whole READ-sized pieces where the stream allows: each sink call costs a write, a
                # progress update and a lock, so 64 KiB pipe reads would multiply those by 64.
                n = 0
                while n < READ and (k := os.readv(fd, [view[n:]])):
                    n += k
                if n:
                    got += n
                    sink(view[:n])  # written at once (pwrite), the buffer is reused after
                if n < READ:
                    break
            rc = proc.wait()
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
        finally:
            self._end()
        if rc == 255 and got == 0:
            raise Unavailable((err.splitlines() or [f"ssh exit {rc}"])[-1][:200])
        if rc != 0 or got != length:
            raise SSHError(
                f"cannot copy {path} from {self.target.label}: {err or f'{got} of {length} bytes'}"
            )

    def _end(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:  # stopped part-way (another stream failed, Ctrl-C)
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()

    def close(self) -> None:
        self._end()
        self._stop_master()
        if self.fallback is not None:
            with contextlib.suppress(Exception):
                self.fallback.close()
