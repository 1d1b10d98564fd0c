"""The per-node agent: start Ray on this node (head on rank 0), rendezvous, supervise, tear down.

One agent runs on every node of the allocation (a single srun step). The agent makes itself a
child subreaper, so every process Ray forks stays its descendant and teardown can stop exactly
this job's Ray processes, never another job's (unlike `ray stop`).

    startray.py    starting Ray (in the agent, or `ray start`), and why which
    rendezvous.py  the job folder: head record, node records, cluster record
    base.py        what every agent has: state, its node record, its processes, teardown
    head.py        the head's duties       worker.py   a worker's (a member's too)
    recovery.py    a lost head: choose and become or join the next one
    this module    the node's life: which role, in which order, and what ends it
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from raybridge.agent import procs, ray_internals
from raybridge.agent.base import Abdicate, HeadLost, detect_seconds, private_dir
from raybridge.agent.ray_internals import GcsView
from raybridge.agent.recovery import CLAIM_STEP, Recovery
from raybridge.agent.startray import IN_AGENT, StopRequested


class Agent(Recovery):
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
        # Import Ray while Slurm starts the step and the interfaces are read (or the head starts).
        threading.Thread(target=ray_internals.preload, daemon=True).start()
        self.start_warm()
        if self.role == "head":
            return self.watch_head(self.become_head(0, expected=lambda: self.settings.nodes))
        head = self.join()
        if head is None:
            return 0
        while True:
            try:
                return self.watch_worker(head)
            except HeadLost as lost:
                if self.role == "member":
                    head = self.rejoin(lost)
                    continue
                outcome = self.recover(lost)
                if isinstance(outcome, GcsView):
                    return self.watch_head(outcome)
                head = outcome


__all__ = ["CLAIM_STEP", "IN_AGENT", "Agent", "StopRequested", "detect_seconds", "private_dir"]
