"""Starting Ray on this node: the options from Slurm's grant and the port plan, the environment, and
the choice between Ray's launcher inside the agent (fast, ray_internals.py) and the `ray start`
command (slow, public). The choice and its reason are recorded with the node.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from raybridge import jobdir as jd
from raybridge.agent import netinfo, ports, ray_internals, resources
from raybridge.agent.procs import MARKER
from raybridge.settings import AgentSettings

T = TypeVar("T")
IN_AGENT = "agent"
RAY_START = "ray start"


class StopRequested(Exception):
    """The job is being stopped while Ray is still starting."""


@dataclass
class HowStarted:
    by: str  # IN_AGENT or RAY_START
    reason: str = ""  # why `ray start`, when it was used


class RayStarter:
    def __init__(
        self,
        settings: AgentSettings,
        env: dict[str, str],
        say: Callable[[str], None],
        stop_requested: Callable[[], bool],
    ):
        self.settings = settings
        self.env = env
        self.say = say
        self.stop_requested = stop_requested
        self.dir = jd.JobDir(settings.job_dir)
        self.spawns = ray_internals.SpawnGuard()
        self.started: ray_internals.Started | None = None  # Ray started in-process
        self.how: HowStarted | None = None
        self.resources: resources.NodeResources | None = None

    def afresh(self) -> None:
        """After this node's Ray was stopped (kill_ray stops the spawn guard, so that nothing of the old
        start spawns late): a new guard for the next start."""
        self.started = None
        self.spawns = ray_internals.SpawnGuard()

    def ray_env(self, iface: netinfo.Iface) -> dict[str, str]:
        env = dict(self.env)
        env[MARKER] = self.settings.job_id
        # Collective libraries use the same fabric as Ray.
        env["NCCL_SOCKET_IFNAME"] = iface.name
        env["GLOO_SOCKET_IFNAME"] = iface.name
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["TMPDIR"] = self.settings.temp_dir  # Python's scratch files go where teardown cleans
        # The head's dashboard writes Grafana dashboards for this Ray version: kept with the job.
        env["RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"] = self.dir.join("grafana", "dashboards")
        if self.settings.max_nodes:
            from raybridge.autoscaler import config as autoscale

            # Ray's autoscaler looks every 5 s by default: most of the time from demand to sbatch.
            env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", str(autoscale.UPDATE_INTERVAL_S))
        if self.settings.auth:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN_PATH"] = self.dir.token
            env.pop("RAY_AUTH_TOKEN", None)
        return env

    def ray_command(
        self, iface: netinfo.Iface, plan: ports.PortPlan, head: jd.HeadRecord | None
    ) -> list[str]:
        res = resources.detect(self.env, self.settings.object_store_fraction, self.settings.gpus_per_node)
        ray = ray_internals.ray_executable(self.env.get("PATH", ""))
        # Task/actor heap: what Slurm granted minus the object store (Ray would assume the whole node).
        heap = max(res.memory_bytes - res.object_store_bytes, 1 << 28)
        cmd = [
            ray or "ray",
            "start",
            f"--node-ip-address={iface.ip}",
            f"--temp-dir={self.settings.temp_dir}",
            f"--num-cpus={res.cpus}",
            f"--num-gpus={len(res.gpu_ids)}",
            f"--object-store-memory={res.object_store_bytes}",
            f"--memory={heap}",
            f"--node-manager-port={plan.node_manager}",
            f"--object-manager-port={plan.object_manager}",
            f"--metrics-export-port={plan.metrics}",
            f"--dashboard-agent-listen-port={plan.dashboard_agent}",
            f"--dashboard-agent-grpc-port={plan.dashboard_agent_grpc}",
            f"--runtime-env-agent-port={plan.runtime_env_agent}",
            f"--min-worker-port={plan.min_worker}",
            f"--max-worker-port={plan.max_worker}",
            "--disable-usage-stats",
        ]
        if head is None and self.settings.max_nodes:  # Ray's autoscaler, with member jobs as nodes
            from raybridge.autoscaler import config as autoscale

            path = autoscale.write_config(self.settings, res.cpus, len(res.gpu_ids), heap)
            cmd.append(f"--autoscaling-config={path}")
        if head is None:
            cmd += [
                "--head",
                f"--port={plan.gcs}",
                f"--ray-client-server-port={plan.client}",
                "--include-dashboard=true",
                f"--dashboard-host={iface.ip}",
                f"--dashboard-port={plan.dashboard}",
            ]
        else:
            cmd.append(f"--address={head.gcs_address}")
        labels = list(self.settings.labels)
        if self.settings.cluster_job:  # a member job's node: which job brought it
            labels.append(f"raybridge.io/job={self.settings.job_id}")
        if labels:  # (the fast start does not pass labels: `ray start` does it)
            cmd.append(f"--labels={','.join(labels)}")
        self.resources = res
        return cmd + list(self.settings.ray_args)

    def start(
        self,
        iface: netinfo.Iface,
        head: jd.HeadRecord | None,
        on_gcs_up: Callable[[ports.PortPlan, dict[str, str] | None], None] | None = None,
    ) -> ports.PortPlan:
        """Start Ray on this node and return once its raylet registered with the GCS.

        In-process unless the profile asks for `ray start`, Ray's internals are not ones the fast
        start was verified on, or its launcher failed before starting a process. A restart (a raylet
        that died, a new head and the nodes that join it) starts in-process too, after afresh(): Ray's
        launcher keeps no state between starts that matters here, and a fresh `ray start` costs a new
        interpreter importing Ray's CLI and, on a head, a wait for the dashboard (scripts/bench-recovery:
        a new head ready 2 s sooner). on_gcs_up(plan, ray_dirs) runs on the head once the GCS serves."""
        plan = ports.choose_plan(self.settings.job_id, iface.ip)
        cmd = self.ray_command(iface, plan, head)
        env = self.ray_env(iface)
        assert self.resources is not None
        if self.resources.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.resources.gpu_ids)
        else:
            env.pop("CUDA_VISIBLE_DEVICES", None)  # 'NoDevFiles' would confuse Ray
        logfile = Path(self.dir.start_log(netinfo.short_hostname()))
        self.say(
            f"starting Ray on {iface.name} {iface.ip}, ports {plan.min_worker - ports.WORKER_OFFSET}+ "
            f"({self.resources.cpus} CPUs, {len(self.resources.gpu_ids)} GPUs)"
        )
        if self.settings.ray_start == "command":
            self.how = HowStarted(RAY_START, "profile: ray_start: command")
            self.say("using the `ray start` command (profile: ray_start: command)")
        else:
            # Ray's processes inherit this process's environment; the agent has no other use for it.
            os.environ.clear()
            os.environ.update(env)
            gcs_up = (lambda dirs: on_gcs_up(plan, dirs)) if on_gcs_up else None
            dirs = head.ray_dirs if head else None

            def start_logged() -> ray_internals.Started:
                # The thread owns the log file: a start interrupted by a stop may still write to it.
                with open(logfile, "a") as out:
                    return ray_internals.start(cmd[2:], out, gcs_up, dirs, self.spawns)

            try:
                self.started = self.until_stopped(start_logged)
                self.how = HowStarted(IN_AGENT)
                return plan
            except ray_internals.LaunchUnavailable as e:
                self.how = HowStarted(RAY_START, str(e))
                self.say(f"{e}; using the `ray start` command")
            except RuntimeError as e:
                raise RuntimeError(f"{e}; log {logfile}: {log_tail(logfile)}") from None
        with open(logfile, "a") as out:
            rc = subprocess.run(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            ).returncode
        if rc != 0:
            raise RuntimeError(f"`ray start` failed (exit {rc}); log {logfile}: {log_tail(logfile)}")
        if on_gcs_up:
            on_gcs_up(plan, None)
        return plan

    def until_stopped(self, fn: Callable[[], T]) -> T:
        """fn() in a thread, unless a stop is requested first (StopRequested): Ray's start can
        wait a long time for a head that is being torn down, and teardown must not wait for it."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = fn()
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e

        thread = threading.Thread(target=target, name="ray-start", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if thread.is_alive() and self.stop_requested():
                raise StopRequested()
        if "error" in result:
            error = result["error"]
            # A start that failed because the job is being stopped (its head went away) is no error.
            if self.stop_requested():
                raise StopRequested()
            raise error
        return result["value"]


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""
