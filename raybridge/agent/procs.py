"""Finding and stopping this job's processes on this node."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterable

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


def stop(find: Callable[[], Iterable[psutil.Process]], grace: float = 3, rounds: int = 5) -> list[str]:
    """SIGTERM everything `find` returns and SIGKILL what is left after `grace` seconds; then look
    again and SIGKILL whatever appeared meanwhile, until nothing is found. One pass is not enough:
    a parent that handles SIGTERM may start a child while it shuts down (Ray's dashboard restarts
    its module processes), and that child would outlive the job. Returns what could not be stopped,
    as "pid:name"."""
    procs: list[psutil.Process] = []
    for attempt in range(rounds):
        procs = live(find())
        if not procs:
            return []
        if attempt == 0:
            signal_all(procs, psutil.Process.terminate)
            _, procs = psutil.wait_procs(procs, timeout=grace)
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
