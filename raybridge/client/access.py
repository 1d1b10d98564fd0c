"""Reaching a cluster from a laptop: the token, the tunnel, the Jobs API client."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import paramiko

from raybridge import jobdir as jd
from raybridge.client.cluster import Cluster
from raybridge.client.profile import ClusterSpec
from raybridge.errors import ClusterError, RaybridgeError
from raybridge.transport.runner import LocalRunner, Runner
from raybridge.transport.ssh import connect, open_sftp, resolve_target
from raybridge.transport.tunnel import Forwarder, Route, Target

PORT_NAMES = ("dashboard", "client", "gcs")  # forwardable ports, as named in cluster.json
DEFAULT_LOCAL = {"dashboard": 8265, "client": 10001, "gcs": 6379}


def cache_dir(runner: Runner, job_id: str) -> Path:
    """~/.cache/raybridge/<login>/<job>: private (0700) copies of what a laptop needs."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raybridge"
    host = (runner.host or "local").replace("/", "_")
    d = base / host / job_id
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in (base, base / host, d):
        os.chmod(p, 0o700)
    return d


def ready_info(cluster: Cluster) -> jd.ClusterRecord:
    job = cluster.job()
    if job is None:
        raise ClusterError(f"job {cluster.job_id} is gone")
    if job.state != "running":
        raise ClusterError(f"job {cluster.job_id} is not running ({job.slurm_state}, reason {job.reason})")
    info = cluster.info()
    if info is None or info.state != "ready" or info.head is None:
        state = info.state if info else "unknown"
        raise ClusterError(f"the Ray cluster of job {cluster.job_id} is not ready (state: {state})")
    return info


def fetch_token(cluster: Cluster, info: jd.ClusterRecord) -> Path | None:
    """Copy the cluster's token to the local cache (mode 0600); None when auth is off. The token is read
    where the job folder's layout puts it, never where a record says (a record is data, not a pointer)."""
    if info.auth != "token":
        return None
    text = cluster.runner.read_text(cluster.dir.token)
    if not text:
        raise ClusterError(f"cannot read the cluster token {cluster.dir.token}")
    dest = cache_dir(cluster.runner, cluster.job_id) / "token"
    LocalRunner().write_text(str(dest), text.strip())  # atomic, 0600 from the start
    return dest


def targets_from(info: jd.ClusterRecord) -> dict[str, Target]:
    if info.head is None:
        return {}
    ports = info.ports or info.head.ports
    return {name: Target(name, info.head.ip, int(ports[name])) for name in PORT_NAMES if name in ports}


def make_forwarder(
    spec: ClusterSpec,
    job_dir: str,
    local_ports: dict[str, int],
    token_file: Path | None = None,
    log: Any = lambda m: None,
) -> Forwarder:
    """A forwarder with its own SSH connection that follows the cluster record (cluster.json): the
    head's ports and, when the job restarted (requeue), its new token, also copied to token_file."""
    if spec.login is None:
        raise RaybridgeError("a tunnel needs a login host (the profile's login, or --login)")
    target = resolve_target(spec.login)
    known: dict[str, Any] = {}  # the cluster start whose token we have, and that token

    def connect_once() -> paramiko.SSHClient:
        return connect(target)

    def resolve(client: paramiko.SSHClient) -> Route:
        try:
            with open_sftp(client) as sftp:
                folder = jd.JobDir(job_dir)
                with sftp.open(folder.cluster) as f:
                    info = jd.parse(f.read().decode(), jd.ClusterRecord, folder.cluster)
                if info is None or info.state != "ready":
                    raise ClusterError(f"cluster not ready (state {info.state if info else 'unknown'})")
                start = info.started_at
                if info.auth == "token" and known.get("start") != start:
                    with sftp.open(folder.token) as f:
                        known.update(start=start, token=f.read().decode().strip())
                    if token_file:
                        LocalRunner().write_text(str(token_file), known["token"])
        except (OSError, paramiko.SSHException, ValueError) as e:
            raise ClusterError(f"cannot read the cluster record in {job_dir}: {e}") from None
        return Route(targets_from(info), known.get("token") if info.auth == "token" else None)

    return Forwarder(connect_once, resolve, local_ports, log=log)


def auth_env(token_path: Path | None) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)} if token_path else {}


def jobs_client(address: str, token_path: Path | None):  # -> JobSubmissionClient
    """Ray's own Jobs API client; the token travels in the Authorization header Ray adds."""
    os.environ.update(auth_env(token_path))
    if token_path is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection and auth errors surface here
        raise ClusterError(f"the Jobs API at {address} did not answer: {str(e).splitlines()[0]}") from None
