"""Entry points used by the generated sbatch script:

python -m raybridge.agent prepare      job folder + auth token (batch step, once)
python -m raybridge.agent node         the per-node agent (one per node, from srun)
python -m raybridge.agent wait-ready   block until all nodes joined; print exports for the driver
python -m raybridge.agent stop         ask every agent to tear down
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import sys
import time

from raybridge import clusterinfo as ci
from raybridge.agent.node import Agent, AgentConfig


def prepare(cfg: AgentConfig) -> int:
    cfg.job_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg.job_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(cfg.job_dir, 0o700)
    # A requeued job keeps its id and folder: drop the previous start's rendezvous state.
    for stale in (ci.HEAD, ci.STOP, ci.TOKEN, ci.PREEMPT):
        (cfg.job_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(cfg.job_dir / ci.NODES, ignore_errors=True)
    (cfg.job_dir / ci.NODES).mkdir()
    (cfg.job_dir / "logs").mkdir(exist_ok=True)
    if cfg.auth:
        # Created 0600 from the start: the token is never readable by others, even briefly.
        fd = os.open(cfg.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    submitted = os.environ.get("RAYBRIDGE_SUBMITTED_AT")
    ci.write_json(
        cfg.job_dir / ci.CLUSTER,
        {
            "job_id": cfg.job_id,
            "job_name": os.environ.get("SLURM_JOB_NAME", ""),
            "state": "starting",
            "expected_nodes": cfg.nodes,
            "auth": "token" if cfg.auth else "none",
            "token_path": str(cfg.token_path) if cfg.auth else None,
            "job_dir": str(cfg.job_dir),
            "submitted_at": float(submitted) if submitted else None,
            "started_at": ci.now(),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),  # requeues so far
        },
    )
    return 0


def wait_ready(cfg: AgentConfig, agents_pid: int | None) -> int:
    deadline = time.monotonic() + cfg.ready_timeout + 60
    while True:
        info = ci.read_json(cfg.job_dir / ci.CLUSTER) or {}
        if info.get("state") == "ready":
            break
        if info.get("state") in ("failed", "stopped"):
            print(f"raybridge: cluster {info.get('state')}: {info.get('error', '')}", file=sys.stderr)
            return 1
        if agents_pid and not pid_alive(agents_pid):
            print("raybridge: the agents' srun step ended before the cluster was ready", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print("raybridge: timed out waiting for the cluster", file=sys.stderr)
            return 1
        time.sleep(0.2)
    exports = {"RAY_ADDRESS": info["address"], "RAYBRIDGE_JOB_DIR": str(cfg.job_dir)}
    if cfg.auth:
        exports |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cfg.token_path)}
    for k, v in exports.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("prepare", "node", "wait-ready", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    cfg = AgentConfig.from_env(os.environ)
    if argv[0] == "prepare":
        return prepare(cfg)
    if argv[0] == "node":
        return Agent(cfg, os.environ).run()
    if argv[0] == "wait-ready":
        pid = int(argv[1]) if len(argv) > 1 else None
        return wait_ready(cfg, pid)
    (cfg.job_dir / ci.STOP).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
