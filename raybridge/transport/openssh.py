"""Bulk byte ranges through the user's own OpenSSH client, where it exists (checkpoint pulls).

paramiko decrypts every packet in Python, under one interpreter lock: a few streams of it are bound by
one core. `ssh` decrypts in C, one process per stream, so parallel streams use as many cores as the
machine has. paramiko keeps the control connection (commands, listings, SFTP, tunnels); this module
carries only the bytes of `dd` ranges, which the caller hashes as they land and checks against the
source's sha256 — integrity never depends on which client carried them.

The same rules as the paramiko connection: the target as raybridge resolved it (host, port, user, key
files), the user's known_hosts file and the site-wide one, strict host-key checking (the control
connection has already checked or recorded the key), no prompts (BatchMode), no user config file
(-F none: nothing in it can change where the bytes come from). A target behind ProxyJump, or an `ssh`
that refuses to connect (exit 255 before any byte), falls back to paramiko for the rest of the copy.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from raybridge.errors import SSHError

log = logging.getLogger(__name__)

GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
READ = 1 << 20


class Unavailable(SSHError):
    """ssh could not connect (exit 255, no byte arrived): use paramiko instead."""


def ssh_argv(target: Any, ssh: str, remote: str) -> list[str]:
    """The `ssh` command for one remote command on target (a resolved SSHTarget)."""
    argv = [ssh, "-F", "none", "-T", "-x", "-a", "-p", str(target.port), "-l", target.user]
    for opt in (
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        f"UserKnownHostsFile={target.known_hosts}",
        f"GlobalKnownHostsFile={GLOBAL_KNOWN_HOSTS}",
        "ConnectTimeout=15",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
        "ControlMaster=no",
        "ControlPath=none",
        "LogLevel=ERROR",
    ):
        argv += ["-o", opt]
    for key in target.identity_files:
        argv += ["-i", key]
    return [*argv, "--", target.hostname, remote]


def usable(target: Any) -> str | None:
    """The path of `ssh` when this target can be reached with it, else None."""
    if target.proxy_jump:
        return None
    return shutil.which("ssh")


class BulkRanges:
    """A RangeReader (transfer.py): `dd` of one range on the login node, its stdout read from `ssh`;
    paramiko's reader (fallback()) when ssh is not usable here."""

    def __init__(self, target: Any, fallback: Callable[[], Any]):
        self.target = target
        self.ssh = usable(target)
        self.fallback_factory = fallback
        self.fallback: Any = None
        self.proc: subprocess.Popen[bytes] | None = None

    def read(self, path: str, offset: int, length: int, sink: Callable[[bytes], None]) -> None:
        if self.ssh is not None and self.fallback is None:
            try:
                self._read_ssh(path, offset, length, sink)
                return
            except Unavailable as e:
                log.info("OpenSSH stream unavailable (%s); using paramiko", e)
                self.ssh = None
        if self.fallback is None:
            self.fallback = self.fallback_factory()
        self.fallback.read(path, offset, length, sink)

    def _read_ssh(self, path: str, offset: int, length: int, sink: Callable[[bytes], None]) -> None:
        dd = [
            "dd",
            f"if={path}",
            "bs=4M",
            f"skip={offset}",
            f"count={length}",
            "status=none",
            "iflag=skip_bytes,count_bytes,nofollow",
        ]
        argv = ssh_argv(self.target, self.ssh or "ssh", shlex.join(dd))
        got = 0
        self.proc = proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            while data := proc.stdout.read1(READ):
                got += len(data)
                sink(data)
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
        if self.fallback is not None:
            with contextlib.suppress(Exception):
                self.fallback.close()
