"""A worker's duties: join the head, keep its raylet alive, notice a lost head, and leave with Ray's
drain notice when its member job is released."""

from __future__ import annotations

import contextlib
import socket
import time

from raybridge import jobdir as jd
from raybridge.agent import netinfo, procs, ray_internals
from raybridge.agent.base import MAX_RAY_RESTARTS, AgentBase, HeadLost
from raybridge.agent.ray_internals import GcsUnavailable, GcsView
from raybridge.agent.startray import StopRequested

DRAIN_GRACE_S = 3.0  # a released member node's work gets this long after Ray's drain notice
# A raylet missing this long (two looks of the 0.2-s loop) is restarted: a new worker group after a lost
# worker waits for this node's resources (scripts/bench-recovery).
RAYLET_GONE_S = 0.3


class WorkerRole(AgentBase):
    def join(self) -> jd.HeadRecord | None:
        """Wait for the head's record, start Ray here and join it; None when stopped first."""
        head = self.rendezvous.wait_for_head(self.stop_requested)
        if head is None:
            return None
        self.iface = netinfo.choose(list(self.settings.interface), netinfo.ipv4_interfaces(), head.ip)
        plan = self.ray.start(self.iface, head)
        self.write_node(self.iface, plan)
        self.say(f"joined head {head.ip}")
        return head

    def watch_worker(self, head: jd.HeadRecord) -> int:
        """Until stop: reap orphans, restart a dead raylet, leave when released (member nodes), and
        raise HeadLost when the head's GCS has not answered for Ray's failure detection time or a
        newer head was published."""
        last_head_check = 0.0
        missing_since: float | None = None
        head_down_since: float | None = None
        drained_said = False
        background_due = time.monotonic() + 30  # at the latest; normally once the cluster is ready
        while not self.stop_requested():
            procs.reap()
            now = time.monotonic()
            started = self.ray.started
            if started and not started.background_started:
                rec = self.rendezvous.cluster()
                if (rec and rec.state == "ready") or now > background_due:
                    started.start_background()
            if self.role == "member" and self.rendezvous.release_flagged():
                self.drain(head)
                raise StopRequested()
            if now - last_head_check >= 0.5:
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
            if head_down_since is None and not self.has_process("raylet"):
                missing_since = missing_since or now
                if self.rendezvous.preempt_flagged():
                    # Drained at Slurm's USR1: Ray ends a drained node's raylet once it is idle. The
                    # job is ending; a new raylet would join a cluster that places nothing here.
                    if not drained_said:
                        drained_said = True
                        self.say("this node's Ray left after the drain notice; waiting for the job's end")
                elif now - missing_since >= RAYLET_GONE_S and self.iface:
                    self.restart_worker(self.iface, head)
                    missing_since = None
            time.sleep(0.2)
        return 0

    def restart_worker(self, iface: netinfo.Iface, head: jd.HeadRecord) -> None:
        if self.restarts >= MAX_RAY_RESTARTS:
            raise RuntimeError(f"the raylet on this node died {self.restarts + 1} times; giving up")
        self.restarts += 1
        self.say(f"the raylet on this node died; restarting Ray (attempt {self.restarts})")
        self.kill_ray(grace=0.5)  # what is left of a node whose raylet died: nothing to wait for
        self.ray.afresh()
        plan = self.ray.start(iface, head)
        self.write_node(iface, plan)

    def drain(self, head: jd.HeadRecord) -> None:
        """Ray's drain notice for this node (reason preemption): the scheduler stops placing work here
        and tells what runs here that the node goes; the work is retried elsewhere when the node's Ray
        stops. A Ray that refuses it: the node just leaves."""
        node_id = self.own_node_id(head)
        if node_id is None:
            # Ray's autoscaler drains an idle node itself before it asks for its release.
            self.say(
                "released: this node has already left Ray (drained by Ray's autoscaler, or gone); leaving"
            )
            return
        problem = ray_internals.drain_node(
            head.gcs_address, node_id, "raybridge: node released (scale --remove, autoscaler)", DRAIN_GRACE_S
        )
        if problem:
            self.say(f"released: no drain notice ({problem}); leaving")
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


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """A TCP connect: refused at once when the process is gone, times out when the node is."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False
