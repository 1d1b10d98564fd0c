"""What every node's agent has, whatever its role: state, messages, stop requests, its node record,
its own Ray processes, and the teardown that stops exactly those (never another job's).

The roles build on it: head.py (start and keep the head), worker.py (join, supervise, drain),
recovery.py (a lost head: choose and become or join the next one); node.py puts them together.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import psutil

from raybridge import jobdir as jd
from raybridge import trust
from raybridge.agent import keeplogs, netinfo, ports, procs, ray_internals, warm
from raybridge.agent.rendezvous import Rendezvous
from raybridge.agent.replace import Replacer
from raybridge.agent.startray import RayStarter
from raybridge.settings import AgentSettings

log = logging.getLogger("raybridge.agent.node")
MAX_RAY_RESTARTS = 3
MAX_HEAD_LOSSES = jd.MAX_HEAD_LOSSES


def detect_seconds(env: Mapping[str, str]) -> float:
    """Ray's own node failure detection time (the script sets it: checks 1 s apart): a head is
    declared lost after as long."""
    return float(env.get("RAY_health_check_failure_threshold") or 3)


class Abdicate(Exception):
    """This node stops being the head; the others choose a new one (the cluster is not failed)."""


class HeadLost(Exception):
    def __init__(self, head: jd.HeadRecord, why: str):
        super().__init__(why)
        self.head = head


WARM_RECHECK_S = 30.0


class AgentBase:
    def __init__(self, settings: AgentSettings, env: Mapping[str, str]):
        self.settings = settings
        self.host = netinfo.short_hostname()
        if settings.cluster_job:  # a member job's node: a worker that never becomes the head
            self.role = "member"
        else:
            self.role = "head" if settings.rank == settings.head_rank else "worker"
        self.stopping = False
        self.batch_host_gone = False  # the head found the batch host removed from the job (head.py)
        self.batch_lock = threading.Lock()
        self.restarts = 0
        self.generation = 0
        self.head_losses = 0
        self.iface: netinfo.Iface | None = None
        self.detect_s = detect_seconds(env)
        self.watched: dict[str, psutil.Process] = {}  # name -> process, so a check is one /proc read
        self.rendezvous = Rendezvous(settings)
        self.replacer = Replacer(settings, self.rendezvous)
        self.ray = RayStarter(settings, dict(env), self.say, self.stop_requested)
        self.raylet_address: str | None = None  # ip:node manager port, once Ray runs here
        self.warm_gcs: str | None = None  # the head: its GCS, whose actor table warm.json follows
        self.warm_paused = False  # a head starting: the nodes' own start has the CPU until they are in
        self.warm = warm.Keeper(
            self.rendezvous.dir,
            settings.warm_workers,
            lambda: self.raylet_address,
            self.rendezvous.dir.token if settings.auth else None,
            self.say,
            lambda: self.role == "head",
        )

    # ------------------------------------------------------------ plumbing

    def say(self, message: str) -> None:
        log.info(message, extra={"node": f"{self.host}/{self.role}"})

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.say(f"received {signal.Signals(signum).name}; stopping this job's Ray processes")
        self.stopping = True

    def stop_requested(self) -> bool:
        return self.stopping or self.rendezvous.stop_flagged()

    def write_node(self, iface: netinfo.Iface, plan: ports.PortPlan) -> None:
        res, how = self.ray.resources, self.ray.how
        assert res is not None and how is not None
        self.raylet_address = f"{iface.ip}:{plan.node_manager}"
        self.warm.raylet_restarted()
        self.rendezvous.write_node(
            jd.NodeRecord(
                rank=self.settings.rank,
                hostname=self.host,
                ip=iface.ip,
                interface=iface.name,
                cpus=res.cpus,
                gpus=len(res.gpu_ids),
                memory_bytes=res.memory_bytes,
                object_store_bytes=res.object_store_bytes,
                ports=plan.as_dict(),
                joined_at=jd.now(),
                restarts=self.restarts,
                ray_started_by=how.by,
                ray_start_reason=how.reason or None,
                temp_dir=self.settings.temp_dir,
                generation=self.generation,
                member_job=self.settings.job_id if self.settings.cluster_job else None,
            )
        )

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

    # ------------------------------------------------------------ warm workers

    def start_warm(self) -> None:
        """Warm workers (agent/warm.py) in a thread of their own: their Ray calls (the actor table, the
        raylet's PrestartWorkers, up to 5 s each) never hold up the loops that notice a lost head or
        batch host."""
        if self.settings.warm_workers > 0:
            threading.Thread(target=self.warm_loop, name="raybridge-warm", daemon=True).start()

    def warm_loop(self) -> None:
        publish_next, gcs = 0.0, None
        while not self.stop_requested():
            now = time.monotonic()
            try:
                if self.role == "head" and self.warm_gcs and now >= publish_next:
                    if gcs is None or gcs.address != self.warm_gcs:
                        gcs = ray_internals.GcsView(self.warm_gcs)
                    rec = warm.publish(self.rendezvous.dir, gcs, self.warm_gcs.rsplit(":", 1)[0])
                    # The actor table can be large (a Serve or Data cluster): once the training's
                    # runtime envs are known, a look every WARM_RECHECK_S follows a new program.
                    known = rec is not None and rec.controller_env is not None
                    publish_next = now + (WARM_RECHECK_S if known else 2.0)
                if not self.warm_paused:
                    self.warm.step(now)
            except ray_internals.GcsUnavailable:
                publish_next = now + 2.0  # busy: the next look
            except Exception as e:  # not what agent/warm.py expects of this Ray: none kept, one line
                self.say(f"warm workers: none kept ({ray_internals.first_line(e)})")
                return
            time.sleep(0.2)  # as the main loops: a restarted raylet is asked at once

    # ------------------------------------------------------------ teardown

    def kill_ray(self, grace: float = 3) -> None:
        self.ray.spawns.stop()  # Ray may be starting something in a thread (a node, the dashboard)
        # Ray's own order (`ray stop`): the raylet first, so the agents it shares fate with exit with
        # it instead of failing on their own; the GCS last, so nothing waits for a GCS that is gone.
        left = procs.stop(self.own_processes, grace=grace, first={"raylet"}, last={"gcs_server"})
        if left:
            self.say(f"could not stop {', '.join(left)}")

    def own_processes(self) -> list[psutil.Process]:
        return procs.descendants() + procs.marked(self.settings.job_id)

    def teardown(self) -> None:
        self.kill_ray()
        kept = keeplogs.keep(self.settings.temp_dir, self.rendezvous.dir.kept_logs(self.host))
        if kept:
            self.say(f"kept {kept} Ray log files in {self.rendezvous.dir.kept_logs(self.host)}")
        shutil.rmtree(self.settings.temp_dir, ignore_errors=True)
        if self.role == "head":
            with contextlib.suppress(Exception):
                rec = self.rendezvous.cluster()
                if rec and rec.state != "failed":
                    self.rendezvous.update_cluster(state="stopped", stopped_at=jd.now())
                rec = self.rendezvous.cluster()
                if rec and rec.state in ("stopped", "failed"):  # not when handing over to a new head
                    self.rendezvous.withdraw_targets()
        self.say("stopped this job's Ray processes")


def private_dir(path: str) -> None:
    """Create path (mode 0700), or accept it only as this user's own private folder: on a node with a
    shared /tmp another user could create rb-<job id> before the job (or a link in its place) and
    then own the folder that holds Ray's sockets and logs."""
    if problem := trust.private_folder_problem(path):
        raise RuntimeError(f"{path} already exists and {problem}: remove it, or set node_tmp in the profile")
