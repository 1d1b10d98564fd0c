"""Warm workers: every node keeps an idle Ray worker process ready for the next training worker group.

When a node is lost, Ray Train replaces the whole worker group: one new actor per training node,
each in a fresh Python process that starts, imports Ray, Ray Train and torch, and only then joins
the process group; when the head is lost, the whole Ray cluster starts again and the restarted
driver's Ray Train controller needs a fresh process too. Ray's scheduler gives a new actor an idle
worker process with the same runtime env when one is there (one started for no job in particular
takes the job of the first actor it gets). So:

- the head reads Ray's actor table every few seconds: the runtime env (serialized, exactly as Ray's
  scheduler hashes it) of the alive Ray Train workers, and of Ray Train's controller with the nodes
  it runs on (the driver's), go to <job folder>/warm.json;
- every node's agent keeps `warm_workers` idle processes with the workers' runtime env among its own
  descendants, and CONTROLLER_WARM with the controller's where the controller ran (on the head:
  after a lost head, the new one), what a restarted driver starts first, asking its raylet for them
  (Ray's PrestartWorkers, for no job) when there are fewer. Workers of raybridge.train.make_trainer start through raybridge.preload (the profile's
  `preload`): a warm one has torch and Ray Train imported while it waits.

A process is asked for at once when this node's Ray (re)started (after a lost head every process is
new; the new head asks once the nodes are in, when the restarted driver starts: before that their
own start has the CPU).
After one was taken, REFILL_DELAY_S later (a recovery is under way: the CPU is the new worker
group's). Only a runtime env of environment variables (and raybridge.preload) is kept warm: anything
else (pip, a working_dir, a container) would make Ray build it on every node just in case. A request Ray refuses
ends warm workers on that node with one line in the agent's log; nothing else depends on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psutil

from raybridge import jobdir as jd
from raybridge import trust
from raybridge.agent import procs, ray_internals
from raybridge.agent.ray_internals import ActorView
from raybridge.settings import MODULE

TRAIN_WORKER_CLASS = "RayTrainWorker"  # Ray Train's worker actor (ray.train.v2 worker_group.worker)
CONTROLLER_CLASS = "TrainController"  # Ray Train's controller actor, on the driver's node
IDLE_TITLE = "ray::IDLE"  # what Ray's worker processes call themselves while they wait for work
REFILL_DELAY_S = 10.0
# A new driver's Ray Train starts four actors with the controller's runtime env on the driver's node:
# the controller, its placement group cleaner, preemption watcher and the worker group's sync actor.
# All four are kept (a lost worker's new group takes a new sync actor and preemption watcher); a node
# whose Ray (re)started keeps one of each runtime env for REFILL_DELAY_S, then all: four processes starting
# together on a new head took more of its CPU than they saved (scripts/bench-recovery, head case: 17.5
# and 17.7 s with four at once, 16.7 s with one).
CONTROLLER_WARM = 4
# A requested process shows up within seconds, or it is asked for again.
PENDING_S = 5.0
KEEP_ALIVE_S = 600  # Ray may end an idle process after this (above its soft limit); then another
CHECK_S = 1.0


@dataclass(frozen=True)
class WarmRecord(jd.Record):
    """What to keep warm: runtime envs, serialized exactly as Ray's scheduler hashes them."""

    KIND: ClassVar[str] = "warm"
    runtime_env: str  # Ray Train's workers': every node
    controller_env: str | None = None  # Ray Train's controller's: on the nodes below
    controller_ips: list[str] = field(default_factory=list)
    # The controller ran on the head's node (a batch or Jobs driver does): after a lost head, the new
    # head is where the restarted driver's controller starts.
    controller_on_head: bool = False


def job_number(job_id: str) -> int:
    """Ray's job ids are little-endian counters (01000000 is job 1)."""
    try:
        return int.from_bytes(bytes.fromhex(job_id), "little")
    except ValueError:
        return -1


def newest(actors: list[ActorView], class_name: str) -> list[ActorView]:
    """The alive actors of this class of the newest job that has any."""
    mine = [a for a in actors if a.class_name == class_name]
    if not mine:
        return []
    job = max(mine, key=lambda a: job_number(a.job_id)).job_id
    return [a for a in mine if a.job_id == job]


def choose(
    actors: list[ActorView], ips: dict[str, str], last: WarmRecord | None, head_ip: str | None = None
) -> WarmRecord | None:
    """The record from the alive actors (ips: node id -> address); what is not alive now is kept
    from the last record (after a lost head nothing is alive until the driver starts again)."""
    workers, controllers = newest(actors, TRAIN_WORKER_CLASS), newest(actors, CONTROLLER_CLASS)
    runtime_env = workers[0].runtime_env if workers else last.runtime_env if last else None
    if runtime_env is None:
        return None
    if controllers:
        where = sorted({ips[a.node_id] for a in controllers if a.node_id in ips})
        return WarmRecord(runtime_env, controllers[0].runtime_env, where, head_ip in where)
    if last:
        return WarmRecord(runtime_env, last.controller_env, last.controller_ips, last.controller_on_head)
    return WarmRecord(runtime_env)


def warmable(runtime_env: str) -> bool:
    """Whether a runtime env may be kept warm: environment variables, and raybridge's own preloading
    start (raybridge.preload with this Python); anything else would make Ray build it on every node."""
    if runtime_env.strip() in ("", "{}"):
        return True
    try:
        env = json.loads(runtime_env)
    except ValueError:
        return False
    if not isinstance(env, dict) or not set(env) <= {"env_vars", "py_executable"}:
        return False
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
    ):
        return False
    return "py_executable" not in env or is_preload(env["py_executable"])


def is_preload(py_executable: Any) -> bool:
    """raybridge.preload.command(this Python, some modules)."""
    try:
        exe, *rest = shlex.split(py_executable)
    except (ValueError, AttributeError):
        return False
    same = os.path.realpath(exe) == os.path.realpath(sys.executable)
    return (
        same
        and len(rest) == 4
        and rest[:3] == ["-P", "-m", "raybridge.preload"]
        and all(MODULE.fullmatch(name) for name in rest[3].split(","))
    )


def state(title: str, cmdline: list[str]) -> str:
    """A Ray worker process's state from its title: "idle", "starting" (not connected yet: the
    raylet's command line), "busy" (Ray retitled it after its actor or task), or "other"."""
    if title.startswith(IDLE_TITLE):
        return "idle"
    if title.startswith("ray::"):
        return "busy"
    if any(arg.endswith("default_worker.py") for arg in cmdline):
        return "starting"
    return "other"


def workers() -> dict[int, tuple[str, float]]:
    """Our descendants (this node's Ray) that are Ray worker processes: pid -> (state, started at)."""
    out = {}
    for p in procs.descendants():
        with contextlib.suppress(psutil.Error):
            cmdline = p.cmdline()
            st = state(cmdline[0] if cmdline else "", cmdline)
            if st != "other":
                out[p.pid] = (st, p.create_time())
    return out


def publish(folder: jd.JobDir, gcs: ray_internals.GcsView, head_ip: str | None = None) -> WarmRecord | None:
    """The head's part (head_ip: its own address): warm.json as Ray's actor table says now
    (unchanged: not rewritten)."""
    try:
        last = read(folder)
    except trust.TrustError:
        last = None  # replaced by the head's own
    ips = {n["node_id"]: n["ip"] for n in gcs.nodes() if n["alive"]}
    chosen = choose(gcs.alive_actors(), ips, last, head_ip)
    if chosen is not None and chosen != last:
        jd.write(folder.warm, chosen)
    return chosen


def read(folder: jd.JobDir) -> WarmRecord | None:
    """warm.json, or None when there is none (yet); TrustError when it fails the trust rule: what it
    holds becomes a process's environment and command."""
    if not os.path.lexists(folder.warm):
        return None
    with contextlib.suppress(jd.RecordError):
        return jd.parse(trust.read_private(folder.warm), WarmRecord, folder.warm)
    return None


def wanted(rec: WarmRecord, count: int, ip: str | None, head: bool = False) -> list[tuple[str, int]]:
    """(runtime env, how many) this node keeps, in the order they are needed: where the driver runs
    (the controller's node; the head, if it ran there: after a lost head, the new one), first
    CONTROLLER_WARM with the controller's (the restarted driver's controller starts before any
    training worker), then the workers'."""
    out = [(rec.runtime_env, count)]
    driver_here = ip in rec.controller_ips or (head and rec.controller_on_head)
    if rec.controller_env is not None and driver_here and rec.controller_env != rec.runtime_env:
        out.insert(0, (rec.controller_env, CONTROLLER_WARM))
    return out


class Keeper:
    """One node's part: keep the idle workers warm.json asks for. Two runtime envs may hold the same
    variables, so the processes this keeper asked for are told apart by the order the raylet started
    them in: the requests of one look go out back to back, and the worker processes that appear after
    them, oldest first, are theirs in the same order."""

    def __init__(
        self,
        folder: jd.JobDir,
        count: int,
        raylet: Callable[[], str | None],
        token_path: str | None,
        say: Callable[[str], None],
        is_head: Callable[[], bool] = lambda: False,
    ):
        self.folder, self.count, self.raylet, self.token_path, self.say = (
            folder,
            count,
            raylet,
            token_path,
            say,
        )
        self.is_head = is_head
        self.last_check = 0.0
        self.mine: dict[int, str] = {}  # pid -> the runtime env it was asked for with
        self.expect: list[str] = []  # runtime envs of requested processes not seen yet, in order
        self.before: set[int] = set()  # the worker processes there were when they were requested
        self.expect_until = 0.0
        self.urgent = True  # this node's Ray (re)started: ask at once
        # When this node's Ray (re)started (the first look after): for REFILL_DELAY_S one process of each
        # runtime env, so that a new head's recovery does not compete with four controller processes.
        self.started_at: float | None = None
        self.capped = False
        self.short_since: float | None = None
        self.stopped = False  # Ray refused a request, or the runtime env is more than env_vars
        self.said = False

    def raylet_restarted(self) -> None:
        """This node's Ray started (again): every process of the old one is gone."""
        self.urgent, self.short_since, self.last_check, self.started_at = True, None, 0.0, None
        self.mine.clear()
        self.expect.clear()

    def step(self, now: float | None = None) -> None:
        """One look (at most every CHECK_S): ask for processes when there are too few."""
        now = time.monotonic() if now is None else now
        if self.count <= 0 or self.stopped or now - self.last_check < CHECK_S:
            return
        self.last_check = now
        try:
            rec = read(self.folder)
        except trust.TrustError as e:
            self.stopped = True
            self.say(f"warm workers: none kept ({e})")
            return
        raylet = self.raylet()
        if raylet is not None and self.started_at is None:
            self.started_at = now
        if rec is None or raylet is None:
            return
        targets = wanted(rec, self.count, raylet.rsplit(":", 1)[0], self.is_head())
        if now - self.started_at < REFILL_DELAY_S:  # Ray (re)started here: one of each for now
            targets = [(env, min(n, 1)) for env, n in targets]
            self.capped = True
        elif self.capped:  # the rest at once when that time is over
            self.capped, self.urgent = False, True
        if not all(warmable(env) for env, _ in targets):
            self.stopped = True
            self.say("warm workers: none kept (the training's runtime env holds more than variables)")
            return
        seen = workers()
        if self.expect:
            new = sorted(
                (pid for pid in seen if pid not in self.before and pid not in self.mine),
                key=lambda p: seen[p][1],
            )
            for pid in new[: len(self.expect)]:
                self.mine[pid] = self.expect.pop(0)
            if self.expect and now < self.expect_until:
                return
            self.expect.clear()  # not started (the raylet was busy or dropped it): ask again
        # Ours while waiting for work (or still starting); taken (retitled) or gone: no longer ours.
        self.mine = {
            pid: env for pid, env in self.mine.items() if seen.get(pid, ("gone",))[0] in ("idle", "starting")
        }
        short = [(env, n - sum(1 for e in self.mine.values() if e == env)) for env, n in targets]
        short = [(env, n) for env, n in short if n > 0]
        if not short:
            self.short_since, self.urgent = None, False
            return
        self.short_since = self.short_since if self.short_since is not None else now
        if not self.urgent and now - self.short_since < REFILL_DELAY_S:
            return
        self.before = set(seen)
        for env, n in short:
            problem = ray_internals.prestart_workers(raylet, "", env, n, KEEP_ALIVE_S, self.token_path)
            if problem and "UNAVAILABLE" in problem:  # the raylet is (re)starting: the next look
                self.expect.clear()
                return
            if problem:
                self.stopped = True
                self.say(f"warm workers: Ray refused to start one ({problem}); none kept on this node")
                return
            self.expect += [env] * n
        self.expect_until = now + PENDING_S
        if not self.said:
            self.said = True
            self.say(f"warm workers: keeping {self.count} idle worker process(es) for Ray Train")
