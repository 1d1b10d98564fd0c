"""Open the Runner a profile asks for: this host, or the login node over SSH."""

from __future__ import annotations

from raybridge.transport.runner import LocalRunner, LoginSpec, Runner


def open_runner(login: LoginSpec | None) -> Runner:
    if login is None:
        return LocalRunner()
    from raybridge.transport.ssh import SSHRunner  # paramiko loads only when a login node is used

    return SSHRunner(login)
