"""Entry points used by the generated sbatch script:

python -m raybridge.agent prepare      job folder + auth token (batch step, once)
python -m raybridge.agent node         the per-node agent (one per node, from srun)
python -m raybridge.agent wait-ready   block until all nodes joined; print exports for the driver
python -m raybridge.agent driver [PID] -- COMMAND
                                       run the batch driver once every node is alive (driver.py)
python -m raybridge.agent serve NAME GEN -- COMMAND   one generation of a service (agent/serve.py)
python -m raybridge.agent new-head GEN print "HOST GENERATION" of the head that replaced generation GEN;
                                       exit 1 if the head was not lost
python -m raybridge.agent stop         ask every agent to tear down
python -m raybridge.agent doctor FOLDER NODES MARK
                                       `raybridge doctor`'s checks on this node (agent/doctor.py)
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import time

from raybridge import jobdir as jd
from raybridge.agent.driver import pid_alive
from raybridge.settings import SUBMITTED_AT_VAR, AgentSettings, SettingsError


class NodeFormatter(logging.Formatter):
    """`raybridge[<host>/<role>] HH:MM:SS.mmm message`: the job log's line format."""

    def __init__(self, node: str):
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        node = getattr(record, "node", self.node)
        return f"raybridge[{node}] {stamp} {record.getMessage()}"


def setup_logging(settings: AgentSettings) -> None:
    """raybridge's own loggers to the process's real stdout (Ray's start may be redirecting
    sys.stdout to its log meanwhile); Ray's loggers are left alone."""
    host = socket.gethostname().split(".")[0]
    handler = logging.StreamHandler(sys.__stdout__ or sys.stdout)
    handler.setFormatter(
        NodeFormatter(f"{host}/{'head' if settings.rank == settings.head_rank else 'worker'}")
    )
    logger = logging.getLogger("raybridge")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def wait_ready(settings: AgentSettings, agents_pid: int | None) -> int:
    folder = jd.JobDir(settings.job_dir)
    deadline = time.monotonic() + settings.ready_timeout + 60
    while True:
        info = jd.read(folder.cluster, jd.ClusterRecord)
        if info and info.state == "ready":
            break
        if info and info.state in ("failed", "stopped"):
            print(f"raybridge: cluster {info.state}: {info.error or ''}", file=sys.stderr)
            return 1
        if agents_pid and not pid_alive(agents_pid):
            print("raybridge: the agents' srun step ended before the cluster was ready", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print("raybridge: timed out waiting for the cluster", file=sys.stderr)
            return 1
        time.sleep(0.2)
    exports = {"RAY_ADDRESS": info.address or "", "RAYBRIDGE_JOB_DIR": folder.path}
    if settings.auth:
        exports |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": folder.token}
    for k, v in exports.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


def new_head(settings: AgentSettings, generation: int) -> int:
    """After the batch driver died with its node (or stopped for a lost head): the head that took
    over, once published. Exit 1 when no head loss shows up within the time the agents need to notice
    one and claim the head (the driver's end was its own), or the cluster failed or stopped."""
    from raybridge.agent.node import CLAIM_STEP, detect_seconds

    folder = jd.JobDir(settings.job_dir)
    noticed_by = time.monotonic() + detect_seconds(os.environ) + CLAIM_STEP * settings.nodes + 3
    started_by = noticed_by + settings.ready_timeout
    while True:
        head = jd.read(folder.head, jd.HeadRecord)
        info = jd.read(folder.cluster, jd.ClusterRecord)
        if head and head.generation > generation:
            print(f"{head.hostname} {head.generation}")
            return 0
        if info and info.state in ("failed", "stopped"):
            return 1
        recovering = bool(info and info.generation > generation)
        if time.monotonic() > (started_by if recovering else noticed_by):
            return 1
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in (
        "prepare", "node", "wait-ready", "driver", "serve", "new-head", "stop", "doctor"
    ):  # fmt: skip
        print(__doc__, file=sys.stderr)
        return 2
    try:
        settings = AgentSettings.from_env(os.environ)
    except SettingsError as e:
        print(f"raybridge agent: {e}", file=sys.stderr)
        return 2
    if argv[0] == "node":  # every node: one line, not a traceback, when its Python cannot run us
        from raybridge import envcheck

        if why := envcheck.problem(settings.versions):
            print(envcheck.ERROR_MARK + why, flush=True)
            return 3
    setup_logging(settings)
    if argv[0] == "prepare":
        from raybridge.agent.rendezvous import Rendezvous

        Rendezvous(settings).prepare(
            job_name=os.environ.get("SLURM_JOB_NAME", ""),
            submitted_at=os.environ.get(SUBMITTED_AT_VAR),
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        )
        return 0
    if argv[0] == "node":
        from raybridge.agent.node import Agent

        return Agent(settings, os.environ).run()
    if argv[0] == "doctor":
        from raybridge.agent import doctor

        return doctor.main(settings, argv[1:])
    if argv[0] == "driver":
        from raybridge.agent import driver

        return driver.main(settings, argv[1:])
    if argv[0] == "serve":
        from raybridge.agent import serve

        return serve.main(settings, argv[1:])
    if argv[0] == "new-head":
        if len(argv) != 2 or not argv[1].isdigit():
            print("raybridge agent: usage: new-head GENERATION", file=sys.stderr)
            return 2
        return new_head(settings, int(argv[1]))
    if argv[0] == "wait-ready":
        pid = int(argv[1]) if len(argv) > 1 else None
        return wait_ready(settings, pid)
    open(jd.JobDir(settings.job_dir).stop, "a").close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
