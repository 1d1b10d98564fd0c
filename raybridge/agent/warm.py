"""Warm workers: every node keeps an idle Ray worker process ready for the next training worker group.

When a node is lost, Ray Train replaces the whole worker group: one new actor per training node,
each in a fresh Python process that starts, imports Ray, Ray Train and torch, and only then joins
the process group (on the test bed about 5 of the ~10 seconds a worker loss costs). Ray's scheduler
gives a new actor an idle worker process when one of the same job and runtime env is there. So:

- the head looks at Ray's actor table every few seconds: the job and runtime env of the alive Ray
  Train workers (or, after a lost head, the new driver's job with the runtime env seen before) go
  to <job folder>/warm.json;
- every node's agent keeps `warm_workers` idle processes of that job and runtime env among its own
  descendants, asking its raylet for one (Ray's PrestartWorkers) when there are fewer; with the
  profile's `preload` (Ray's preload_python_modules) those processes import torch and Ray Train
  while they wait, before any actor needs them.

A new process is asked for at once when the job is new here (the first worker group runs; after a
lost head, a new driver's group is about to start) or this node's Ray restarted (it rejoins, and a
worker of the new group may land on it); REFILL_DELAY_S after one was taken (a recovery is under
way: the CPU is the new worker group's). Only a runtime env of environment variables is kept warm: anything else
(pip, a working_dir, a container) would make Ray build it on every node just in case. Anything Ray
refuses ends warm workers for that job with one line in the agent's log; nothing else depends on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import psutil

from raybridge import jobdir as jd
from raybridge.agent import procs, ray_internals
from raybridge.agent.ray_internals import ActorView

TRAIN_WORKER_CLASS = "RayTrainWorker"  # Ray Train's worker actor (ray.train.v2 worker_group.worker)
IDLE_TITLE = "ray::IDLE"  # what Ray's worker processes call themselves while they wait for work
REFILL_DELAY_S = 10.0
PENDING_S = 30.0  # a requested process shows up within this long, or it is asked for again
KEEP_ALIVE_S = 3600  # Ray may end an idle process after this; the next look asks for another
CHECK_S = 1.0


@dataclass(frozen=True)
class WarmRecord(jd.Record):
    """The job and runtime env (serialized, exactly as Ray hashes it) of the training workers."""

    KIND: ClassVar[str] = "warm"
    job_id: str
    runtime_env: str
    seen_at: float = 0.0


def job_number(job_id: str) -> int:
    """Ray's job ids are little-endian counters (01000000 is job 1)."""
    try:
        return int.from_bytes(bytes.fromhex(job_id), "little")
    except ValueError:
        return -1


def choose(actors: list[ActorView], jobs: list[str], last: WarmRecord | None) -> WarmRecord | None:
    """What to keep warm: the newest job's alive training workers; with none alive, the last record
    while its job lives, or (a lost head: a new GCS, the driver started again) the newest alive job
    with the last record's runtime env; None when no driver is alive."""
    train = [a for a in actors if a.class_name == TRAIN_WORKER_CLASS]
    if train:
        newest = max(train, key=lambda a: job_number(a.job_id))
        return WarmRecord(newest.job_id, newest.runtime_env, jd.now())
    if last is None or not jobs:
        return None
    if last.job_id in jobs:
        return last
    return WarmRecord(max(jobs, key=job_number), last.runtime_env, jd.now())


def env_vars_only(runtime_env: str) -> dict[str, str] | None:
    """The runtime env's environment variables when that is all it holds, else None."""
    if runtime_env.strip() in ("", "{}"):
        return {}
    with contextlib.suppress(ValueError):
        env = json.loads(runtime_env)
        if isinstance(env, dict) and set(env) <= {"env_vars"}:
            env_vars = env.get("env_vars") or {}
            if isinstance(env_vars, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
            ):
                return env_vars
    return None


def is_warm(title: str, environ: dict[str, str], job_id: str, env_vars: dict[str, str]) -> bool:
    """An idle worker process of this job with this runtime env's variables."""
    return (
        title.startswith(IDLE_TITLE)
        and environ.get("RAY_JOB_ID") == job_id
        and all(environ.get(k) == v for k, v in env_vars.items())
    )


def idle_workers(job_id: str, env_vars: dict[str, str]) -> list[int]:
    """Our descendants (this node's Ray) that are idle workers of this job and runtime env."""
    out = []
    for p in procs.descendants():
        with contextlib.suppress(psutil.Error):
            cmdline = p.cmdline()
            if cmdline and is_warm(cmdline[0], p.environ(), job_id, env_vars):
                out.append(p.pid)
    return out


def publish(folder: jd.JobDir, gcs: ray_internals.GcsView) -> WarmRecord | None:
    """The head's part: warm.json as Ray's actor and job tables say now (unchanged: not rewritten)."""
    last = read(folder)
    chosen = choose(gcs.alive_actors(), gcs.alive_jobs(), last)
    if chosen is None:
        if last is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder.warm)
        return None
    if last is None or (chosen.job_id, chosen.runtime_env) != (last.job_id, last.runtime_env):
        jd.write(folder.warm, chosen)
    return chosen


def read(folder: jd.JobDir) -> WarmRecord | None:
    with contextlib.suppress(jd.RecordError):
        return jd.read(folder.warm, WarmRecord)
    return None


class Keeper:
    """One node's part: keep `count` idle workers of the recorded job and runtime env."""

    def __init__(
        self,
        folder: jd.JobDir,
        count: int,
        raylet: Callable[[], str | None],
        token_path: str | None,
        say: Callable[[str], None],
    ):
        self.folder, self.count, self.raylet, self.token_path, self.say = (
            folder,
            count,
            raylet,
            token_path,
            say,
        )
        self.last_check = 0.0
        self.job: str | None = None  # the job this node last kept workers for
        self.urgent = False  # a new job, or this node's Ray restarted: ask at once
        self.short_since: float | None = None
        self.pending_until = 0.0
        self.refused: set[str] = set()  # jobs (and runtime envs) Ray or this module would not warm
        self.announced: set[str] = set()

    def raylet_restarted(self) -> None:
        """This node's Ray started again and rejoins: a worker of the next group may land here."""
        self.urgent, self.pending_until, self.last_check = True, 0.0, 0.0

    def step(self, now: float | None = None) -> None:
        """One look (at most every CHECK_S): ask for a process when there are too few."""
        now = time.monotonic() if now is None else now
        if self.count <= 0 or now - self.last_check < CHECK_S:
            return
        self.last_check = now
        rec = read(self.folder)
        raylet = self.raylet()
        if rec is None or raylet is None:
            return
        key = f"{rec.job_id} {rec.runtime_env}"
        if key in self.refused:
            return
        env_vars = env_vars_only(rec.runtime_env)
        if env_vars is None:
            self.refused.add(key)
            self.say("warm workers: none kept (the training's runtime env is more than env_vars)")
            return
        if self.job != rec.job_id:
            self.urgent = True
            self.job, self.short_since, self.pending_until = rec.job_id, None, 0.0
        have = len(idle_workers(rec.job_id, env_vars))
        if have >= self.count:
            self.short_since, self.pending_until, self.urgent = None, 0.0, False
            return
        if now < self.pending_until:
            return
        self.short_since = self.short_since if self.short_since is not None else now
        if not self.urgent and now - self.short_since < REFILL_DELAY_S:
            return
        problem = ray_internals.prestart_workers(
            raylet, rec.job_id, rec.runtime_env, self.count - have, KEEP_ALIVE_S, self.token_path
        )
        if problem and "UNAVAILABLE" in problem:  # the raylet is (re)starting: the next look
            return
        if problem:
            self.refused.add(key)
            self.say(f"warm workers: Ray refused to start one ({problem}); none kept for job {rec.job_id}")
            return
        self.pending_until = now + PENDING_S
        if rec.job_id not in self.announced:
            self.announced.add(rec.job_id)
            self.say(f"warm workers: keeping {self.count} idle worker process(es) for job {rec.job_id}")
