"""The head's duties: start Ray's head and publish it, wait until every node is in, keep the cluster
record current, replace nodes that die (--replace-lost), and end the job when Slurm took its batch
host away."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import threading
import time
from collections.abc import Callable

from raybridge import jobdir as jd
from raybridge.agent import netinfo, ports, procs, ray_internals, slurmjob
from raybridge.agent.base import Abdicate, AgentBase
from raybridge.agent.ray_internals import GcsUnavailable, GcsView
from raybridge.agent.startray import StopRequested
from raybridge.errors import RaybridgeError
from raybridge.slurm import SlurmClient
from raybridge.transport.runner import LocalRunner

BATCH_CHECK_S = 1.0  # how often the head asks Slurm whether the batch host is still in the job
# After a lost head, a batch driver's restart (its controller, the new workers' imports) is what the
# user waits for: the new head's dashboard and Ray Client server (~3 s of CPU for the dashboard's
# processes) start once its training is back (raybridge.train's restore) or this long after the nodes
# are in, whichever is first.
SERVICES_DEFER_S = 15.0


class HeadRole(AgentBase):
    def become_head(self, generation: int, expected: Callable[[], int]) -> GcsView:
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

        self.warm_paused, self.warm_gcs = True, None
        plan = self.ray.start(iface, None, on_gcs_up=publish)
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
        self.warm_gcs = head.gcs_address
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
                self.warm_paused = False  # after a lost head: warm workers with the restarted driver
                self.rendezvous.update_cluster(nodes_alive_at=alive_at)
            if started and alive_at and not started.services_started and self.services_due(alive_at):
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

    def watch_head(self, gcs: GcsView) -> int:
        """Until stop: reap orphans, keep cluster.json current (a node that died may be replaced), and
        leave if another node took over as head or this node's GCS died."""
        last_refresh = 0.0
        drain_given = False
        if self.settings.rank != 0:
            self.watch_batch_host()
        while not self.stop_requested():
            procs.reap()
            now = time.monotonic()
            if now - last_refresh > 2:
                last_refresh = now
                self.refresh(gcs)
            if self.batch_host_gone:
                raise StopRequested()
            if not drain_given and self.rendezvous.preempt_flagged():
                drain_given = True
                threading.Thread(
                    target=self.drain_all, args=(gcs,), name="raybridge-drain", daemon=True
                ).start()
            time.sleep(0.2)
        if self.stopping and self.settings.rank != 0:
            # Slurm stops the step's tasks (SIGTERM) when the batch host died with the step's srun:
            # this is the last moment to requeue the job, or nobody will.
            with contextlib.suppress(StopRequested, RaybridgeError, OSError):
                self.check_batch_host()
        return 0

    def services_due(self, alive_at: float) -> bool:
        """Whether the head's services start now (SERVICES_DEFER_S): at once on a first head, or when
        no batch driver runs here; after a lost head, once the restarted training restored its
        checkpoint (an event after the nodes were in) or SERVICES_DEFER_S after that."""
        if self.generation == 0 or time.time() >= alive_at + SERVICES_DEFER_S:
            return True
        events = jd.event_times(self.rendezvous.dir)
        if not events.get("driver_started"):
            return True
        return any(at > alive_at for at in events.get("restored", ()))

    def drain_all(self, gcs: GcsView) -> None:
        """Slurm's USR1 (the time limit or a preemption ahead): Ray's drain notice for every node, with
        the time left as its deadline, so Ray Train's preemption path (ray.train.get_preemption_info,
        PreemptionError, max_preemption_failures) and Serve see what raybridge.train.preempted() sees."""
        signalled = self.rendezvous.preempt_flagged_at() or time.time()
        left = None
        if self.settings.signal_seconds:
            left = max(self.settings.signal_seconds - (time.time() - signalled), 0)
        try:
            nodes = [n for n in gcs.nodes() if n["alive"]]
        except GcsUnavailable as e:
            self.say(f"USR1: no drain notice (the GCS did not answer: {e})")
            return
        refused = []
        for n in nodes:
            if problem := ray_internals.drain_node(
                gcs.address, n["node_id"], "raybridge: Slurm's USR1", left
            ):
                refused.append(f"{n['ip']}: {problem}")
        when = f"deadline in {left:.0f}s" if left is not None else "no deadline"
        detail = f"{len(nodes) - len(refused)} of {len(nodes)} nodes, {when}"
        detail += f"; not drained: {'; '.join(refused)}" if refused else ""
        self.say(f"USR1: Ray's drain notice given to {detail}")
        self.rendezvous.log_event("drained", self.host, detail)

    def refresh(self, gcs: GcsView) -> None:
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

    def watch_batch_host(self) -> None:
        """Ask Slurm every BATCH_CHECK_S in a thread of its own: the refresh can wait seconds on a GCS
        that is busy with a dying node, and Slurm ends this step about two seconds after it removed
        the batch host (seen: 2.2 s), so a check in the same loop could come too late."""
        if shutil.which("scontrol") is None:  # e.g. a container image without Slurm's client
            self.say(
                "scontrol is not on this node's PATH (in the container?): no check for a lost batch host, "
                "and replace_lost/autoscaling cannot submit jobs; see docs/containers.md"
            )
            return

        def loop() -> None:
            while not self.stop_requested() and not self.batch_host_gone:
                time.sleep(BATCH_CHECK_S)
                with contextlib.suppress(StopRequested, RaybridgeError, OSError):
                    self.check_batch_host()

        threading.Thread(target=loop, name="raybridge-batch-host", daemon=True).start()

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
        with self.batch_lock:  # the watcher thread and the last check at SIGTERM: once
            if self.batch_host_gone:
                raise StopRequested()
            self.batch_host_gone = True
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
