"""A small exception hierarchy. The CLI turns every RaybridgeError into one line (cli/errors.py)."""

from __future__ import annotations

import shlex


class RaybridgeError(Exception):
    """Base class: anything raybridge reports to a user as a one-line message."""


class ConfigError(RaybridgeError):
    """A profile or option is invalid; nothing was submitted."""


class CommandError(RaybridgeError):
    """A command (local or over SSH) failed; carries what is needed to debug it."""

    def __init__(self, argv: list[str], returncode: int, stdout: str = "", stderr: str = "", host: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.host = host
        where = f" on {host}" if host else ""
        detail = (stderr or stdout).strip().splitlines()
        last = detail[-1] if detail else "no output"
        super().__init__(f"`{shlex.join(self.argv)}` failed{where} (exit {returncode}): {last}")


class SSHError(RaybridgeError):
    """The login node could not be reached or refused us."""


class HostKeyError(SSHError):
    """The login node's host key is unknown or does not match known_hosts."""


class SlurmError(RaybridgeError):
    """Slurm rejected a request or reported something we cannot parse."""


class JobNotFound(RaybridgeError):
    """No such raybridge job (or it left Slurm's memory)."""


class ClusterError(RaybridgeError):
    """The Ray cluster did not come up, or failed while running."""
