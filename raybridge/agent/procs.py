"""Finding and stopping this job's processes on this node."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Collection, Iterable

import psutil

PR_SET_CHILD_SUBREAPER = 36
MARKER = "RAYBRIDGE_JOB_ID"  # set in every Ray process the agent starts


def become_subreaper() -> None:
    """Orphans of our descendants are re-parented to us, so they stay findable (and reaped)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def marked(job_id: str) -> list[psutil.Process]:
    """Processes of this user on this node that carry this job's marker (Ray processes that escaped
    the tree). "This node" = our network namespace: nodes that share one kernel (containers, the
    test bed) must not sweep each other. Processes that retitle themselves (Ray's agents) overwrite
    their environment, so this finds only the others; the tree finds the rest."""
    me, here = os.getuid(), netns(os.getpid())
    out = []
    for p in psutil.process_iter(["uids"]):
        try:
            mine = p.info["uids"] and p.info["uids"].real == me and p.pid != os.getpid()
            if mine and netns(p.pid) == here and p.environ().get(MARKER) == job_id:
                out.append(p)
        except psutil.Error:
            continue
    return out


def netns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def stop(
    find: Callable[[], Iterable[psutil.Process]],
    grace: float = 3,
    first: Collection[str] = (),
    last: Collection[str] = (),
    rounds: int = 5,
) -> list[str]:
    """Stop everything `find` returns: SIGTERM, and SIGKILL what is still there when the `grace`
    seconds are over; processes named in `first` before the others, those in `last` after them.
    Then look again and SIGKILL whatever appeared meanwhile, until nothing is found: a process that
    handles SIGTERM may start a child while it shuts down, and that child would outlive the job.
    Returns what could not be stopped, as "pid:name"."""
    for attempt in range(rounds):
        procs = live(find())
        if not procs:
            return []
        if attempt == 0:
            deadline = time.monotonic() + grace
            for group in (
                [p for p in procs if name(p) in first],
                [p for p in procs if name(p) not in first and name(p) not in last],
                [p for p in procs if name(p) in last],
            ):
                signal_all(group, psutil.Process.terminate)
                _, alive = psutil.wait_procs(group, timeout=max(deadline - time.monotonic(), 0.1))
                signal_all(alive, psutil.Process.kill)
                psutil.wait_procs(alive, timeout=2)
        else:
            signal_all(procs, psutil.Process.kill)
            psutil.wait_procs(procs, timeout=2)
        reap()
    return [f"{p.pid}:{name(p)}" for p in live(find())]


def live(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Distinct processes that have not exited (a zombie is gone, only not yet collected)."""
    out: dict[int, psutil.Process] = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = p
    return list(out.values())


def signal_all(procs: Iterable[psutil.Process], send: Callable[[psutil.Process], None]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            send(p)


def name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def reap() -> None:
    """Collect exited orphans that were re-parented to us (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
