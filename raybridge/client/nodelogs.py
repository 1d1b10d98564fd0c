"""Ray's own logs of one node: read on the node while the job runs (an `srun --overlap` step), or
from the job folder once the node's agent stopped (kept there, gzip-compressed, by agent/keeplogs.py)."""

from __future__ import annotations

import posixpath

from raybridge import jobdir as jd
from raybridge.errors import ClusterError, CommandError
from raybridge.transport.runner import Runner

# `--ray NAME` → the files of that Ray process in its session's logs folder.
PROCESSES: dict[str, tuple[str, ...]] = {
    "raylet": ("raylet.out", "raylet.err"),
    "gcs": ("gcs_server.out", "gcs_server.err"),
    "dashboard": ("dashboard.log", "dashboard.err"),
    "dashboard-agent": ("dashboard_agent.log", "dashboard_agent.err"),
    "runtime-env-agent": ("runtime_env_agent.log", "runtime_env_agent.err"),
    "monitor": ("monitor.log", "monitor.out", "monitor.err"),
    "log-monitor": ("log_monitor.log", "log_monitor.err"),
    "client-server": ("ray_client_server.out", "ray_client_server.err"),
}


def kept_files(runner: Runner, folder: jd.JobDir, host: str) -> list[str]:
    """Kept log files of host (relative names, without .gz), sorted; [] if none were kept."""
    r = runner.run(
        ["find", folder.kept_logs(host), "-type", "f", "-name", "*.gz", "-printf", "%P\\0"], check=False
    )
    return sorted(n.removesuffix(".gz") for n in r.stdout.split("\0") if n) if r.returncode == 0 else []


def read_kept(runner: Runner, folder: jd.JobDir, host: str, name: str) -> str:
    return runner.run(
        ["gzip", "-dc", posixpath.join(folder.kept_logs(host), name + ".gz")], timeout=120
    ).stdout


def live_files(runner: Runner, job_id: str, host: str, temp_dir: str) -> list[str]:
    logs = posixpath.join(temp_dir, "session_latest", "logs")
    out = on_node(
        runner, job_id, host, ["find", logs + "/", "-maxdepth", "1", "-type", "f", "-printf", "%f\\n"]
    )
    return sorted(out.split())


def read_live(runner: Runner, job_id: str, host: str, temp_dir: str, name: str) -> str:
    return on_node(runner, job_id, host, ["cat", posixpath.join(temp_dir, "session_latest", "logs", name)])


def on_node(runner: Runner, job_id: str, host: str, argv: list[str]) -> str:
    """Run argv on one node of the running job, beside its agents (--overlap)."""
    step = [
        "srun",
        f"--jobid={job_id}",
        "--overlap",
        "--nodes=1",
        "--ntasks=1",
        f"--nodelist={host}",
        "--quiet",
    ]
    try:
        return runner.run([*step, *argv], timeout=60).stdout
    except CommandError as e:
        raise ClusterError(
            f"cannot read Ray's logs on {host}: {(e.stderr or e.stdout).strip()[:300]}"
        ) from None


def wanted(files: list[str], process: str | None) -> list[str]:
    """The files of one Ray process (all files without one); ClusterError for an unknown name."""
    if process is None:
        return files
    if process not in PROCESSES:
        raise ClusterError(f"unknown Ray process {process!r} (known: {', '.join(PROCESSES)})")
    return [f for f in files if f in PROCESSES[process]]
