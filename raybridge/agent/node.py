"""The per-node agent: start Ray on this node (head on rank 0), rendezvous, watch, tear down.

One agent runs on every node of the allocation (a single srun step). The agent makes itself a
child subreaper, so every process Ray forks stays its descendant and teardown can stop exactly
this job's Ray processes, never another job's (unlike `ray stop`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from raybridge import clusterinfo as ci
from raybridge.agent import launch, netinfo, ports, procs, resources
from raybridge.agent.procs import MARKER

MAX_RAY_RESTARTS = 3
T = TypeVar("T")


class StopRequested(Exception):
    """The job is being stopped while Ray is still starting."""


@dataclass(frozen=True)
class AgentConfig:
    job_id: str
    job_dir: Path
    rank: int
    nodes: int
    interface: list[str]
    node_tmp: str
    ready_timeout: float
    auth: bool
    object_store_fraction: float
    ray_args: list[str]
    ray_start: str = "agent"  # or "command": always the `ray start` command

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AgentConfig:
        job_id = env.get("SLURM_JOB_ID") or fail("SLURM_JOB_ID is not set: run inside a Slurm job")
        job_dir = env.get("RAYBRIDGE_JOB_DIR") or fail("RAYBRIDGE_JOB_DIR is not set")
        return cls(
            job_id=job_id,
            job_dir=Path(job_dir),
            rank=int(env.get("SLURM_PROCID", "0")),
            nodes=int(env.get("RAYBRIDGE_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1),
            interface=(env.get("RAYBRIDGE_INTERFACE") or "auto").split(","),
            node_tmp=env.get("RAYBRIDGE_NODE_TMP") or "/tmp",
            ready_timeout=float(env.get("RAYBRIDGE_READY_TIMEOUT") or 300),
            auth=env.get("RAYBRIDGE_AUTH", "token") == "token",
            object_store_fraction=float(env.get("RAYBRIDGE_OBJECT_STORE_FRACTION") or 0.3),
            ray_args=shlex.split(env.get("RAYBRIDGE_RAY_ARGS") or ""),
            ray_start=env.get("RAYBRIDGE_RAY_START") or "agent",
        )

    @property
    def temp_dir(self) -> Path:
        # Short on purpose: Ray's Unix sockets live under it (107-byte AF_UNIX limit).
        return Path(self.node_tmp) / f"rb-{self.job_id}"

    @property
    def token_path(self) -> Path:
        return self.job_dir / ci.TOKEN


def fail(message: str) -> Any:
    raise SystemExit(f"raybridge agent: {message}")


class Agent:
    def __init__(self, cfg: AgentConfig, env: Mapping[str, str]):
        self.cfg = cfg
        self.env = dict(env)
        self.host = socket.gethostname().split(".")[0]
        self.role = "head" if cfg.rank == 0 else "worker"
        self.stopping = False
        self.restarts = 0
        self.watched: dict[str, psutil.Process] = {}  # name -> process, so a check is one /proc read
        self.started: launch.Started | None = None  # Ray started in-process (launch.py)
        self.spawns = launch.SpawnGuard()

    # ------------------------------------------------------------ plumbing

    def log(self, message: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        # The process's own stdout: Ray's start may be redirecting sys.stdout to its log meanwhile.
        out = sys.__stdout__ or sys.stdout
        print(f"raybridge[{self.host}/{self.role}] {stamp} {message}", file=out, flush=True)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.log(f"received {signal.Signals(signum).name}; stopping this job's Ray processes")
        self.stopping = True

    def stop_requested(self) -> bool:
        return self.stopping or (self.cfg.job_dir / ci.STOP).exists()

    def ray_env(self, iface: netinfo.Iface) -> dict[str, str]:
        env = dict(self.env)
        env[MARKER] = self.cfg.job_id
        # Collective libraries use the same fabric as Ray.
        env["NCCL_SOCKET_IFNAME"] = iface.name
        env["GLOO_SOCKET_IFNAME"] = iface.name
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["TMPDIR"] = str(self.cfg.temp_dir)  # Python's scratch files go where teardown cleans
        if self.cfg.auth:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN_PATH"] = str(self.cfg.token_path)
            env.pop("RAY_AUTH_TOKEN", None)
        return env

    def ray_command(
        self, iface: netinfo.Iface, plan: ports.PortPlan, head: dict[str, Any] | None
    ) -> list[str]:
        res = resources.detect(self.env, self.cfg.object_store_fraction)
        ray = shutil.which(
            "ray", path=os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        )
        cmd = [
            ray or "ray",
            "start",
            f"--node-ip-address={iface.ip}",
            f"--temp-dir={self.cfg.temp_dir}",
            f"--num-cpus={res.cpus}",
            f"--num-gpus={len(res.gpu_ids)}",
            f"--object-store-memory={res.object_store_bytes}",
            # Task/actor heap: what Slurm granted minus the object store (Ray would assume the whole node).
            f"--memory={max(res.memory_bytes - res.object_store_bytes, 1 << 28)}",
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
            cmd.append(f"--address={head['ip']}:{head['ports']['gcs']}")
        self.resources = res
        return cmd + self.cfg.ray_args

    def start_ray(
        self,
        iface: netinfo.Iface,
        head: dict[str, Any] | None,
        in_process: bool = True,
        on_gcs_up: Callable[[ports.PortPlan, dict[str, str] | None], None] | None = None,
    ) -> ports.PortPlan:
        """Start Ray on this node and return once its raylet registered with the GCS.

        In-process (launch.py) unless Ray's internals are not as expected, or for a restart:
        then the `ray start` command, which takes longer but needs nothing from Ray's internals.
        on_gcs_up(plan, ray_dirs) runs on the head once the GCS serves: from then on nodes can join."""
        plan = ports.choose_plan(self.cfg.job_id, iface.ip)
        cmd = self.ray_command(iface, plan, head)
        env = self.ray_env(iface)
        if self.resources.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.resources.gpu_ids)
        else:
            env.pop("CUDA_VISIBLE_DEVICES", None)  # 'NoDevFiles' would confuse Ray
        logfile = self.cfg.job_dir / "logs" / f"ray-start-{self.host}.log"
        self.log(
            f"starting Ray on {iface.name} {iface.ip}, ports {plan.min_worker - ports.WORKER_OFFSET}+ "
            f"({self.resources.cpus} CPUs, {len(self.resources.gpu_ids)} GPUs)"
        )
        if in_process and self.cfg.ray_start == "command":
            self.log("using the `ray start` command (profile: ray_start: command)")
        elif in_process:
            # Ray's processes inherit this process's environment; the agent has no other use for it.
            os.environ.clear()
            os.environ.update(env)
            gcs_up = (lambda dirs: on_gcs_up(plan, dirs)) if on_gcs_up else None
            dirs = head.get("ray_dirs") if head else None

            def start_logged() -> launch.Started:
                # The thread owns the log file: a start interrupted by a stop may still write to it.
                with open(logfile, "a") as out:
                    return launch.start(cmd[2:], out, gcs_up, dirs, self.spawns)

            try:
                self.started = self.until_stopped(start_logged)
                return plan
            except launch.LaunchUnavailable as e:
                self.log(f"{e}; using the `ray start` command")
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
            # A start that failed because the job is being stopped (its head went away) is no error.
            raise StopRequested() if self.stop_requested() else result["error"]
        return result["value"]

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        procs.become_subreaper()
        if self.cfg.auth:  # this agent talks to the GCS too
            os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.cfg.token_path))
        self.cfg.temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.cfg.job_dir / "logs").mkdir(exist_ok=True)
        try:
            return self.head() if self.cfg.rank == 0 else self.worker()
        except StopRequested:
            return 0
        except Exception as e:  # report, then tear down: never leave Ray running
            self.log(f"error: {e}")
            if self.cfg.rank == 0:
                self.update_cluster(state="failed", error=str(e))
            return 1
        finally:
            self.teardown()

    def head(self) -> int:
        # Import Ray while Slurm starts the step and the interfaces are read, not after.
        threading.Thread(target=preload, daemon=True).start()
        iface = netinfo.choose(self.cfg.interface, netinfo.ipv4_interfaces())
        head: dict[str, Any] = {"ip": iface.ip, "hostname": self.host, "interface": iface.name}

        def publish(plan: ports.PortPlan, ray_dirs: dict[str, str] | None) -> None:
            # The rendezvous: nodes start joining now.
            head.update(ports=plan.as_dict(), gcs_up_at=ci.now(), ray_dirs=ray_dirs)
            ci.write_json(self.cfg.job_dir / ci.HEAD, head)

        plan = self.start_ray(iface, None, on_gcs_up=publish)
        head_up = ci.now()
        head["up_at"] = head_up
        self.write_node(iface, plan)
        self.log(f"head up at {iface.ip}:{plan.gcs}; waiting for {self.cfg.nodes} nodes")
        self.update_cluster(
            state="starting",
            head=head,
            address=f"{iface.ip}:{plan.gcs}",
            ports=plan.as_dict(),
            dashboard_url=f"http://{iface.ip}:{plan.dashboard}",
            head_up_at=head_up,
        )
        gcs = GcsView(f"{iface.ip}:{plan.gcs}")
        deadline = time.monotonic() + self.cfg.ready_timeout
        alive_at: float | None = None
        while True:
            # Ready = every raylet alive in the GCS (what `ray.nodes()` reports), every agent has
            # recorded its node (interface, resources), so status is complete from the first moment,
            # and the head's services answer (dashboard/Jobs API, Ray Client): what `up` prints works.
            alive = gcs.alive_count()
            joined = len(list((self.cfg.job_dir / ci.NODES).glob("*.json")))
            if alive_at is None and alive >= self.cfg.nodes and joined >= self.cfg.nodes:
                alive_at = ci.now()
                self.update_cluster(nodes_alive_at=alive_at)
                if self.started:
                    self.started.start_services()
            # `ray start` (started is None) returned only once its services were up.
            waiting = self.started.services_pending() if alive_at and self.started else ""
            if alive_at is not None and not waiting:
                break
            if self.stop_requested():
                return 0
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {alive} of {self.cfg.nodes} Ray nodes alive after "
                    f"{self.cfg.ready_timeout:.0f}s ({joined} agents reported)"
                    + (f"; still waiting for {waiting}" if waiting else "")
                )
            time.sleep(0.1)
        self.update_cluster(state="ready", ready_at=ci.now(), nodes=self.node_records(gcs))
        if self.started:
            self.started.start_background()
        self.log(f"all {self.cfg.nodes} nodes alive; cluster ready")
        return self.watch(gcs)

    def worker(self) -> int:
        threading.Thread(target=preload, daemon=True).start()  # while the head starts
        head = self.wait_for_head()
        if head is None:
            return 0
        iface = netinfo.choose(self.cfg.interface, netinfo.ipv4_interfaces(), head["ip"])
        plan = self.start_ray(iface, head)
        self.write_node(iface, plan)
        self.log(f"joined head {head['ip']}")
        return self.watch(None, iface=iface, head=head)

    def wait_for_head(self) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.cfg.ready_timeout
        path = self.cfg.job_dir / ci.HEAD
        while (head := ci.read_json(path)) is None:
            if self.stop_requested():
                return None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head did not publish {path} within {self.cfg.ready_timeout:.0f}s")
            time.sleep(0.1)
        return head

    def watch(
        self, gcs: GcsView | None, iface: netinfo.Iface | None = None, head: dict[str, Any] | None = None
    ) -> int:
        """Until stop: reap orphans, keep cluster.json current (head), restart a dead raylet (worker)."""
        last_refresh = 0.0
        missing_since: float | None = None
        background_due = time.monotonic() + 30  # at the latest; normally once the cluster is ready
        while not self.stop_requested():
            procs.reap()
            now = time.monotonic()
            if gcs is None and self.started and not self.started.background_started:
                state = (ci.read_json(self.cfg.job_dir / ci.CLUSTER) or {}).get("state")
                if state == "ready" or now > background_due:
                    self.started.start_background()
            if gcs is not None and now - last_refresh > 2:
                last_refresh = now
                if not self.has_process("gcs_server"):
                    raise RuntimeError("the GCS server on the head node died")
                self.update_cluster(nodes=self.node_records(gcs), updated_at=ci.now())
            if gcs is None and not self.has_process("raylet"):
                missing_since = missing_since or now
                if now - missing_since > 1 and iface and head:
                    self.restart_worker(iface, head)
                    missing_since = None
            time.sleep(0.2)
        return 0

    def restart_worker(self, iface: netinfo.Iface, head: dict[str, Any]) -> None:
        if self.restarts >= MAX_RAY_RESTARTS:
            raise RuntimeError(f"the raylet on this node died {self.restarts + 1} times; giving up")
        self.restarts += 1
        self.log(f"the raylet on this node died; restarting Ray (attempt {self.restarts})")
        self.kill_ray()
        self.started = None
        plan = self.start_ray(iface, head, in_process=False)  # a fresh `ray start`: no state kept
        self.write_node(iface, plan)

    def write_node(self, iface: netinfo.Iface, plan: ports.PortPlan) -> None:
        res = self.resources
        (self.cfg.job_dir / ci.NODES).mkdir(exist_ok=True)
        ci.write_json(
            self.cfg.job_dir / ci.NODES / f"{self.cfg.rank}.json",
            {
                "rank": self.cfg.rank,
                "hostname": self.host,
                "ip": iface.ip,
                "interface": iface.name,
                "cpus": res.cpus,
                "gpus": len(res.gpu_ids),
                "memory_bytes": res.memory_bytes,
                "object_store_bytes": res.object_store_bytes,
                "ports": plan.as_dict(),
                "joined_at": ci.now(),
                "restarts": self.restarts,
            },
        )

    def node_records(self, gcs: GcsView) -> list[dict[str, Any]]:
        agents = {}
        for f in (self.cfg.job_dir / ci.NODES).glob("*.json"):
            rec = ci.read_json(f)
            if rec:
                agents[rec["ip"]] = rec
        out = []
        for n in gcs.nodes():
            rec = dict(agents.get(n["ip"], {}))
            rec.update(n)
            rec.setdefault("hostname", n["ray_hostname"])
            out.append(rec)
        return sorted(out, key=lambda r: (not r["alive"], r.get("rank", 1 << 30), r["ip"]))

    def update_cluster(self, **fields: Any) -> None:
        path = self.cfg.job_dir / ci.CLUSTER
        data = ci.read_json(path) or {}
        before = dict(data)
        data.update(fields)
        if data != before:
            ci.write_json(path, data)

    # ------------------------------------------------------------ teardown

    def has_process(self, name: str) -> bool:
        # Listing descendants reads all of /proc; do it only when the remembered process is gone.
        known = self.watched.get(name)
        with contextlib.suppress(psutil.Error):
            if known and known.is_running() and known.status() != psutil.STATUS_ZOMBIE:
                return True
        found = next((p for p in procs.descendants() if procs.name(p) == name), None)
        if found:
            self.watched[name] = found
        else:
            self.watched.pop(name, None)
        return found is not None

    def kill_ray(self) -> None:
        self.spawns.stop()  # Ray may be starting something in a thread (a node, the dashboard)
        # Ray's own order (`ray stop`): the raylet first, so the agents it shares fate with exit with
        # it instead of failing on their own; the GCS last, so nothing waits for a GCS that is gone.
        left = procs.stop(self.own_processes, first={"raylet"}, last={"gcs_server"})
        if left:
            self.log(f"could not stop {', '.join(left)}")

    def own_processes(self) -> list[psutil.Process]:
        return procs.descendants() + procs.marked(self.cfg.job_id)

    def teardown(self) -> None:
        self.kill_ray()
        shutil.rmtree(self.cfg.temp_dir, ignore_errors=True)
        if self.cfg.rank == 0:
            data = ci.read_json(self.cfg.job_dir / ci.CLUSTER) or {}
            if data.get("state") != "failed":
                self.update_cluster(state="stopped", stopped_at=ci.now())
        self.log("stopped this job's Ray processes")


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def preload() -> None:
    """Import Ray's launcher and GCS client ahead of use (about a second of CPU)."""
    launch.preload()
    GcsView.preload()


class GcsView:
    """Node table from the head's GCS (uses the auth token from the environment)."""

    def __init__(self, address: str):
        self.client = self.preload()(address=address)

    @staticmethod
    def preload() -> Any:
        from ray._raylet import GcsClient  # the client `ray status` uses; imported only on the head

        return GcsClient

    def nodes(self) -> list[dict[str, Any]]:
        try:
            info = self.client.get_all_node_info(timeout=5)
        except Exception:
            return []
        out = []
        for node_id, n in info.items():
            total = dict(getattr(n, "resources_total", {}) or {})
            out.append(
                {
                    "node_id": node_id.hex() if hasattr(node_id, "hex") else str(node_id),
                    "ip": n.node_manager_address,
                    "ray_hostname": n.node_manager_hostname,
                    "alive": n.state == 0,
                    "ray_cpus": total.get("CPU", 0),
                    "ray_gpus": total.get("GPU", 0),
                }
            )
        # A restarted node shows up twice: keep the alive record per address.
        best: dict[str, dict[str, Any]] = {}
        for rec in out:
            if rec["ip"] not in best or rec["alive"]:
                best[rec["ip"]] = rec
        return list(best.values())

    def alive_count(self) -> int:
        return sum(1 for n in self.nodes() if n["alive"])
