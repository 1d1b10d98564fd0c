"""Run commands and touch files where Slurm lives: here (LocalRunner) or on the login node over
one persistent SSH connection (SSHRunner, in ssh.py; connect.open_runner picks one). Everything above
this module uses the Runner interface. Imports neither yaml nor paramiko: the agents use it on the
nodes too.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from raybridge import trust
from raybridge.errors import CommandError
from raybridge.transport.transfer import RangeReader


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class LoginSpec:
    """How to reach the login node over SSH (remote mode)."""

    host: str
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    proxy_jump: str | None = None
    accept_new_host_key: bool = False


class Runner(Protocol):
    host: str  # "" when local

    def run(
        self,
        argv: list[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = 60,
        env: dict[str, str] | None = None,
    ) -> Result: ...

    def read_text(self, path: str) -> str | None: ...

    def read_from(self, path: str, offset: int, size: int) -> bytes | None:
        """Up to size bytes of path from offset (b"" at the end; None if path does not exist)."""
        ...

    def write_text(self, path: str, text: str, mode: int = 0o600) -> None: ...

    def makedirs(self, path: str, mode: int = 0o700) -> None: ...

    def listdir(self, path: str) -> list[str]: ...

    def get(self, path: str, local: str, callback: Callable[[int, int], None] | None = None) -> None: ...

    def range_reader(self) -> RangeReader:
        """A reader of byte ranges for one parallel copy stream (transfer.py)."""
        ...

    def home(self) -> str: ...

    def connect_tcp(self, ip: str, port: int, timeout: float = 5) -> Any:
        """A stream to ip:port as the login node reaches it (a socket, or an SSH channel)."""
        ...

    def close(self) -> None: ...


class LocalRunner:
    host = ""

    def run(
        self,
        argv: list[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = 60,
        env: dict[str, str] | None = None,
    ) -> Result:
        try:
            p = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                text=True,
                errors="replace",  # names on shared storage need not be UTF-8
                timeout=timeout,
                env={**os.environ, **env} if env else None,
            )
        except FileNotFoundError:
            raise CommandError(argv, 127, "", f"{argv[0]}: command not found") from None
        except subprocess.TimeoutExpired:
            raise CommandError(argv, 124, "", f"timed out after {timeout}s") from None
        result = Result(argv, p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise CommandError(argv, p.returncode, p.stdout, p.stderr)
        return result

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_from(self, path: str, offset: int, size: int) -> bytes | None:
        try:
            with open(path, "rb") as f:  # opened each time: on NFS an open revalidates the cache
                f.seek(offset)
                return f.read(size)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_text(self, path: str, text: str, mode: int = 0o600) -> None:
        trust.write_atomic(path, text, mode)

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        os.makedirs(path, mode=mode, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def get(self, path: str, local: str, callback: Callable[[int, int], None] | None = None) -> None:
        done = 0
        with open(path, "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(1024 * 1024):
                dst.write(chunk)
                done += len(chunk)
                if callback:
                    callback(done, 0)

    def range_reader(self) -> RangeReader:
        return FileRanges()

    def home(self) -> str:
        return str(Path.home())

    def connect_tcp(self, ip: str, port: int, timeout: float = 5) -> Any:
        return socket.create_connection((ip, port), timeout=timeout)

    def close(self) -> None:
        pass


class FileRanges:
    """Byte ranges of files on this machine."""

    def read(self, path: str, offset: int, length: int, sink: Callable[[bytes], None]) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            end = offset + length
            while offset < end:
                data = os.pread(fd, min(4 << 20, end - offset), offset)
                if not data:
                    raise CommandError(["read", path], 1, "", f"{path} ended at byte {offset} of {end}")
                sink(data)
                offset += len(data)
        finally:
            os.close(fd)

    def close(self) -> None:
        pass
