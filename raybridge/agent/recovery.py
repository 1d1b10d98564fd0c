"""A lost head: the allocation's nodes choose the next one (rank order, the batch host last; the first
to claim the generation's folder wins) and either become it or join it; a member node waits for it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from raybridge import jobdir as jd
from raybridge.agent.base import MAX_HEAD_LOSSES, HeadLost
from raybridge.agent.head import HeadRole
from raybridge.agent.ray_internals import GcsView
from raybridge.agent.startray import StopRequested
from raybridge.agent.worker import WorkerRole

CLAIM_STEP = 1.5  # seconds between head candidates: the next in line claims only if the one before did not


class Recovery(HeadRole, WorkerRole):
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
        self.ray.afresh()
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
            plan = self.ray.start(self.iface, head)
            self.generation = generation
            self.write_node(self.iface, plan)
            self.say(f"joined the new head {head.hostname} {head.ip}")
            return head
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.settings.rank}\n")
        self.say(f"taking over as head (generation {generation})")
        self.rendezvous.new_generation(generation, old)
        return self.become_head(generation, expected=lambda: len(list(folder.glob("rank-*"))))

    def rejoin(self, lost: HeadLost) -> jd.HeadRecord:
        """A member node whose head was lost: the allocation's own nodes choose the next head; this
        node waits for it and joins it."""
        self.head_losses += 1
        if self.head_losses > MAX_HEAD_LOSSES:
            raise RuntimeError(f"the Ray head was lost {self.head_losses} times; giving up")
        self.say(f"the Ray head {lost.head.hostname} is lost ({lost}); waiting for the next one")
        self.kill_ray(grace=0.3)
        self.ray.afresh()
        self.watched.clear()
        head = self.rendezvous.wait_for_head(self.stop_requested, lost.head.generation + 1)
        if head is None:
            raise StopRequested()
        assert self.iface is not None
        plan = self.ray.start(self.iface, head)
        self.generation = head.generation
        self.write_node(self.iface, plan)
        self.say(f"joined the new head {head.hostname} {head.ip}")
        return head
