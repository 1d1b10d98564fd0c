"""The per-node agent: start Ray on this node (head on rank 0), rendezvous, supervise, tear down.

One agent runs on every node of the allocation (a single srun step). The agent makes itself a
child subreaper, so every process Ray forks stays its descendant and teardown can stop exactly
this job's Ray processes, never another job's (unlike `ray stop`).

    startray.py    starting Ray (in the agent, or `ray start`), and why which
    rendezvous.py  the job folder: head record, node records, cluster record
    this module    the node's life: head or worker, supervision, teardown
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from raybridge import jobdir as jd
from raybridge.agent import keeplogs, netinfo, ports, procs, ray_internals, slurmjob
from raybridge.agent.ray_internals import GcsUnavailable, GcsView
from raybridge.agent.rendezvous import Rendezvous
from raybridge.agent.replace import Replacer
from raybridge.agent.startray import IN_AGENT, RayStarter, StopRequested
from raybridge.errors import RaybridgeError
from raybridge.settings import AgentSettings
from raybridge.slurm import SlurmClient
from raybridge.transport.runner import LocalRunner

log = logging.getLogger(__name__)
MAX_RAY_RESTARTS = 3
MAX_HEAD_LOSSES = jd.MAX_HEAD_LOSSES
BATCH_CHECK_S = 5.0  # how often the head asks Slurm whether the batch host is still in the job
DRAIN_GRACE_S = 3.0  # a released member node's work gets this long after Ray's drain notice
CLAIM_STEP = 1.5  # seconds between head candidates: the next in line claims only if the one before did not


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


class Agent:
    def __init__(self, settings: AgentSettings, env: Mapping[str, str]):
        self.settings = settings
        self.host = netinfo.short_hostname()
        if settings.cluster_job:  # a member job's node: a worker that never becomes the head
            self.role = "member"
        else:
            self.role = "head" if settings.rank == settings.head_rank else "worker"
        self.stopping = False
        self.restarts = 0
        self.generation = 0
        self.head_losses = 0
        self.iface: netinfo.Iface | None = None
        self.detect_s = detect_seconds(env)
        self.watched: dict[str, psutil.Process] = {}  # name -> process, so a check is one /proc read
        self.rendezvous = Rendezvous(settings)
        self.replacer = Replacer(settings, self.rendezvous)
        self.ray = RayStarter(settings, dict(env), self.say, self.stop_requested)

    # ------------------------------------------------------------ plumbing

    def say(self, message: str) -> None:
        log.info(message, extra={"node": f"{self.host}/{self.role}"})

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.say(f"received {signal.Signals(signum).name}; stopping this job's Ray processes")
        self.stopping = True

    def stop_requested(self) -> bool:
        return self.stopping or self.rendezvous.stop_flagged()

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        procs.become_subreaper()
        if self.settings.auth:  # this agent talks to the GCS too
            os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.rendezvous.dir.token)
        try:
            private_dir(self.settings.temp_dir)
        except RuntimeError as e:  # nothing of Ray started: report and leave
            self.say(f"error: {e}")
            if self.role == "head":
                with contextlib.suppress(Exception):
                    self.rendezvous.update_cluster(state="failed", error=str(e))
            return 1
        Path(self.rendezvous.dir.logs).mkdir(exist_ok=True)
        try:
            return self.lifecycle()
        except StopRequested:
            return 0
        except Abdicate as e:
            self.say(f"{e}; leaving the cluster to the other nodes")
            self.role = "former head"  # the cluster record is the new head's to write now
            return 1
        except Exception as e:  # report, then tear down: never leave Ray running
            self.say(f"error: {e}")
            if self.role == "head":
                with contextlib.suppress(Exception):
                    self.rendezvous.update_cluster(state="failed", error=str(e))
            return 1
        finally:
            self.teardown()

    def lifecycle(self) -> int:
        """Head or worker; a worker whose head is lost takes part in choosing the next one and
        either becomes it or joins it."""
        if self.role == "head":
            # Import Ray while Slurm starts the step and the interfaces are read, not after.
            threading.Thread(target=ray_internals.preload, daemon=True).start()
            return self.watch(self.become_head(0, in_process=True, expected=lambda: self.settings.nodes))
        threading.Thread(target=ray_internals.preload, daemon=True).start()  # while the head starts
        head = self.rendezvous.wait_for_head(self.stop_requested)
        if head is None:
            return 0
        self.iface = netinfo.choose(list(self.settings.interface), netinfo.ipv4_interfaces(), head.ip)
        plan = self.ray.start(self.iface, head)
        self.write_node(self.iface, plan)
        self.say(f"joined head {head.ip}")
        while True:
            try:
                return self.watch(None, head=head)
            except HeadLost as lost:
                if self.role == "member":
                    head = self.rejoin(lost)
                    continue
                outcome = self.recover(lost)
                if isinstance(outcome, GcsView):
                    return self.watch(outcome)
                head = outcome

    def become_head(self, generation: int, in_process: bool, expected: Callable[[], int]) -> GcsView:
        """Start Ray's head here, publish it, and wait until the expected nodes are in."""
        self.role = "head"
        self.generation = generation
        iface = self.iface or netinfo.choose(list(self.settings.interface), netinfo.ipv4_interfaces())
        self.iface = iface
        published: dict[str, jd.HeadRecord] = {}

        def publish(plan: ports.PortPlan, ray_dirs: dict[str, str] | None) -> None:
            # The rendezvous: nodes start joining now.
            published["head"] = jd.HeadRecord(
                ip=iface.ip,
                hostname=self.host,
                interface=iface.name,
                ports=plan.as_dict(),
                gcs_up_at=jd.now(),
                ray_dirs=ray_dirs,
                rank=self.settings.rank,
                generation=generation,
            )
            self.rendezvous.publish_head(published["head"])

        plan = self.ray.start(iface, None, in_process=in_process, on_gcs_up=publish)
        head_up = jd.now()
        head = dataclasses.replace(published["head"], up_at=head_up)
        self.write_node(iface, plan)
        self.say(f"head up at {iface.ip}:{plan.gcs}; waiting for {expected()} nodes")
        self.rendezvous.update_cluster(
            head=head,
            address=head.gcs_address,
            ports=plan.as_dict(),
            dashboard_url=f"http://{iface.ip}:{plan.dashboard}",
            head_up_at=head_up,
        )
        gcs = GcsView(head.gcs_address)
        self.wait_until_ready(gcs, expected)
        nodes = self.rendezvous.node_records(gcs.nodes())
        if generation:
            self.rendezvous.log_event(
                "head_replaced", self.host, f"generation {generation}, {len(nodes)} nodes"
            )
        self.rendezvous.update_cluster(state="ready", ready_at=jd.now(), nodes=nodes)
        self.rendezvous.publish_targets()
        if self.ray.started:
            self.ray.started.start_background()
        self.say(f"all {len(nodes)} nodes alive; cluster ready")
        return gcs

    def recover(self, lost: HeadLost) -> GcsView | jd.HeadRecord:
        """The head is gone: stop Ray here, say that this node takes part, and claim the head if this
        node is the next in line (rank order, the batch host last) and nobody claimed it first."""
        old = lost.head
        self.head_losses += 1
        if self.head_losses > MAX_HEAD_LOSSES:
            raise RuntimeError(f"the Ray head was lost {self.head_losses} times; giving up")
        generation = old.generation + 1
        self.say(
            f"the Ray head {old.hostname} is lost ({lost}); choosing a new head (generation {generation})"
        )
        self.kill_ray(grace=0.3)  # a node of a cluster that is gone: nothing to shut down gracefully
        self.ray.started = None
        self.watched.clear()
        folder = Path(self.rendezvous.dir.generation(generation))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{self.settings.rank}").touch()
        order = [r for r in self.settings.head_order if r != old.rank]
        wait_until = time.monotonic() + order.index(self.settings.rank) * CLAIM_STEP
        claim = folder / "head"
        while time.monotonic() < wait_until and not claim.exists():
            if self.stop_requested():
                raise StopRequested()
            time.sleep(0.1)
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            head = self.rendezvous.wait_for_head(self.stop_requested, generation)
            if head is None:
                raise StopRequested() from None
            assert self.iface is not None
            plan = self.ray.start(self.iface, head, in_process=False)
            self.generation = generation
            self.write_node(self.iface, plan)
            self.say(f"joined the new head {head.hostname} {head.ip}")
            return head
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.settings.rank}\n")
        self.say(f"taking over as head (generation {generation})")
        self.rendezvous.new_generation(generation, old)
        return self.become_head(
            generation, in_process=False, expected=lambda: len(list(folder.glob("rank-*")))
        )

    def rejoin(self, lost: HeadLost) -> jd.HeadRecord:
        """A member node whose head was lost: the allocation's own nodes choose the next head; this
        node waits for it and joins it."""
        self.head_losses += 1
        if self.head_losses > MAX_HEAD_LOSSES:
            raise RuntimeError(f"the Ray head was lost {self.head_losses} times; giving up")
        self.say(f"the Ray head {lost.head.hostname} is lost ({lost}); waiting for the next one")
        self.kill_ray(grace=0.3)
        self.ray.started = None
        self.watched.clear()
        head = self.rendezvous.wait_for_head(self.stop_requested, lost.head.generation + 1)
        if head is None:
            raise StopRequested()
        assert self.iface is not None
        plan = self.ray.start(self.iface, head, in_process=False)
        self.generation = head.generation
        self.write_node(self.iface, plan)
        self.say(f"joined the new head {head.hostname} {head.ip}")
        return head

    def drain(self, head: jd.HeadRecord) -> None:
        """Ray's drain notice for this node (`ray drain-node`, reason preemption): the scheduler stops
        placing work here and tells what runs here that the node goes; the work is retried elsewhere
        when the node's Ray stops. A Ray without the command: the node just leaves."""
        import shutil
        import subprocess
        import sys

        node_id = self.own_node_id(head)
        ray = shutil.which(
            "ray", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        )
        if not (ray and node_id):
            self.say("released: no drain notice (no node id or no `ray` command); leaving")
            return
        cmd = [
            ray,
            "drain-node",
            f"--address={head.gcs_address}",
            f"--node-id={node_id}",
            "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=raybridge scale --remove",
            f"--deadline-remaining-seconds={int(DRAIN_GRACE_S)}",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ))
        if r.returncode != 0:
            self.say(f"released: Ray refused the drain ({(r.stderr or r.stdout).strip()[-200:]}); leaving")
            return
        self.say(f"released: drain notice given to Ray; leaving in {DRAIN_GRACE_S:.0f}s")
        deadline = time.monotonic() + DRAIN_GRACE_S
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(0.2)

    def own_node_id(self, head: jd.HeadRecord) -> str | None:
        with contextlib.suppress(GcsUnavailable, Exception):
            for n in GcsView(head.gcs_address).nodes():
                if n.get("ip") == (self.iface.ip if self.iface else None) and n.get("alive"):
                    return n.get("node_id")
        return None

    def wait_until_ready(self, gcs: GcsView, expected: Callable[[], int]) -> None:
        """Ready = every raylet alive in the GCS (what `ray.nodes()` reports), every agent has
        recorded its node (interface, resources), so status is complete from the first moment, and
        the head's services answer (dashboard/Jobs API, Ray Client): what `up` prints works."""
        deadline = time.monotonic() + self.settings.ready_timeout
        alive_at: float | None = None
        alive, gcs_error = 0, ""
        started = self.ray.started  # None: `ray start` returned only once its services were up
        while True:
            try:
                alive, gcs_error = gcs.alive_count(), ""
            except GcsUnavailable as e:  # not up yet or busy: the next poll may get through
                gcs_error = str(e)
            joined = self.rendezvous.joined()
            want = expected()
            if alive_at is None and alive >= want and joined >= want:
                alive_at = jd.now()
                self.rendezvous.update_cluster(nodes_alive_at=alive_at)
                if started:
                    started.start_services()
            waiting = started.services_pending() if alive_at and started else ""
            if alive_at is not None and not waiting:
                return
            if self.stop_requested():
                raise StopRequested()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {alive} of {want} Ray nodes alive after "
                    f"{self.settings.ready_timeout}s ({joined} agents reported)"
                    + (f"; still waiting for {waiting}" if waiting else "")
                    + (f"; the GCS did not answer: {gcs_error}" if gcs_error else "")
                )
            time.sleep(0.1)

    def write_node(self, iface: netinfo.Iface, plan: ports.PortPlan) -> None:
        res, how = self.ray.resources, self.ray.how
        assert res is not None and how is not None
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

    # ------------------------------------------------------------ supervision

    def watch(self, gcs: GcsView | None, head: jd.HeadRecord | None = None) -> int:
        """Until stop: reap orphans. The head keeps cluster.json current (and leaves if another node
        took over as head); a worker restarts a dead raylet, and raises HeadLost when its head's GCS
        has not answered for Ray's failure detection time or a newer head was published."""
        last_refresh = last_head_check = 0.0
        batch_check = time.monotonic()
        missing_since: float | None = None
        head_down_since: float | None = None
        background_due = time.monotonic() + 30  # at the latest; normally once the cluster is ready
        while not self.stop_requested():
            procs.reap()
            now = time.monotonic()
            started = self.ray.started
            if gcs is None and started and not started.background_started:
                rec = self.rendezvous.cluster()
                if (rec and rec.state == "ready") or now > background_due:
                    started.start_background()
            if gcs is not None and now - last_refresh > 2:
                last_refresh = now
                newer = self.rendezvous.head()
                if newer and newer.generation > self.generation:
                    raise Abdicate(f"{newer.hostname} took over as head")
                if not self.has_process("gcs_server"):
                    if self.settings.nodes > 1:
                        raise Abdicate("the GCS server on this node died")
                    raise RuntimeError("the GCS server on the head node died")
                with contextlib.suppress(GcsUnavailable):  # busy: the next refresh tells
                    nodes = self.rendezvous.node_records(gcs.nodes())
                    if before := self.rendezvous.cluster():
                        for node in self.rendezvous.node_changes(before.nodes, nodes):
                            self.replacer.on_dead(node)
                    self.rendezvous.update_cluster(nodes=nodes, updated_at=jd.now())
                    self.rendezvous.publish_targets()
            if gcs is not None and self.settings.rank != 0 and now - batch_check > BATCH_CHECK_S:
                batch_check = now
                self.check_batch_host()
            if self.role == "member" and head is not None and self.rendezvous.release_flagged():
                self.drain(head)
                raise StopRequested()
            if gcs is None and head is not None and now - last_head_check >= 0.5:
                last_head_check = now
                newer = self.rendezvous.head()
                if newer and newer.generation > head.generation:
                    raise HeadLost(head, f"{newer.hostname} took over")
                if port_open(head.ip, head.ports["gcs"]):
                    head_down_since = None
                else:
                    head_down_since = head_down_since or now
                    if now - head_down_since >= self.detect_s:
                        raise HeadLost(
                            head, f"its GCS {head.gcs_address} did not answer for {self.detect_s:.0f}s"
                        )
            if gcs is None and head_down_since is None and not self.has_process("raylet"):
                missing_since = missing_since or now
                if now - missing_since > 1 and self.iface and head:
                    self.restart_worker(self.iface, head)
                    missing_since = None
            time.sleep(0.2)
        return 0

    def check_batch_host(self) -> None:
        """With --no-kill, Slurm removes a failed batch host from the job, kills the batch script and
        lets the job run on (until its time limit) with nobody to run or restart the driver. The head
        notices (the batch host is no longer in the job's node list) and ends this start of the job:
        a requeue if the job may be requeued, else a cancel with the reason recorded."""
        slurm = SlurmClient(LocalRunner())
        lost = slurmjob.batch_host_lost(slurm, self.settings.job_id)
        if lost is None:
            return
        host, requeue = lost
        self.rendezvous.log_event("batch_host_lost", host, "requeue" if requeue else "no requeue: job ends")
        if requeue:
            self.say(f"the batch host {host} was lost; requeueing the job")
            slurm.requeue(self.settings.job_id)
        else:
            error = f"the batch host {host} was lost (the job was not submitted with --requeue)"
            self.say(f"{error}; ending the job")
            self.rendezvous.update_cluster(state="failed", error=error)
            self.role = "former head"  # keep that record as it is
            with contextlib.suppress(RaybridgeError):
                slurm.cancel(self.settings.job_id)
        raise StopRequested()

    def restart_worker(self, iface: netinfo.Iface, head: jd.HeadRecord) -> None:
        if self.restarts >= MAX_RAY_RESTARTS:
            raise RuntimeError(f"the raylet on this node died {self.restarts + 1} times; giving up")
        self.restarts += 1
        self.say(f"the raylet on this node died; restarting Ray (attempt {self.restarts})")
        self.kill_ray()
        self.ray.started = None
        plan = self.ray.start(iface, head, in_process=False)  # a fresh `ray start`: no state kept
        self.write_node(iface, plan)

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


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """A TCP connect: refused at once when the process is gone, times out when the node is."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def private_dir(path: str) -> None:
    """Create path (mode 0700), or accept it only as this user's own private folder: on a node with a
    shared /tmp another user could create rb-<job id> before the job (or a link in its place) and
    then own the folder that holds Ray's sockets and logs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}"
    elif stat.S_IMODE(st.st_mode) & 0o077:
        problem = f"is open to others (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise RuntimeError(f"{path} already exists and {problem}: remove it, or set node_tmp in the profile")


__all__ = ["IN_AGENT", "Agent", "StopRequested", "private_dir"]
