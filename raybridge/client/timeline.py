"""One job's life in order, from its records: `raybridge status JOB --timeline` and `status --json`.

Sources: the cluster record's timestamps (submitted, started, head up, all alive, ready, stopped) and
its events (kept by the head: nodes dead or back, head lost and replaced, requeues), each node's
join time, and the events written outside the head (driver start and end, checkpoint restores).
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from typing import Any

from raybridge import jobdir as jd
from raybridge.transport.runner import Runner

# The cluster record's timestamps, as timeline events.
PHASES = {
    "submitted_at": "queued",
    "started_at": "started",
    "head_up_at": "head_up",
    "nodes_alive_at": "all_alive",
    "ready_at": "ready",
    "stopped_at": "stopped",
}
MAX_SIDE_EVENTS = 500  # a job folder is shared storage: bounded reads, whatever was planted there
MAX_EVENT_BYTES = 4096
EARLIEST, LATEST = 946684800.0, 4102444800.0  # 2000-01-01 .. 2100-01-01: any other time is not a job's
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(data: Any) -> dict[str, Any] | None:
    """An event as it may be shown: a time in range, short texts without control characters (a terminal
    must not take them as commands); None for anything else."""
    at = data.get("at") if isinstance(data, dict) else None
    if isinstance(at, bool) or not isinstance(at, int | float) or not EARLIEST <= at <= LATEST:
        return None
    return {k: CONTROL.sub(" ", str(data.get(k) or ""))[:300] for k in ("event", "node", "detail")} | {
        "at": at
    }


def side_events(runner: Runner, folder: jd.JobDir) -> list[dict[str, Any]]:
    """The events/ files (newest MAX_SIDE_EVENTS, each read up to MAX_EVENT_BYTES); anything unreadable,
    malformed or out of range is skipped."""
    names = sorted(n for n in runner.listdir(folder.events) if n.endswith(".json") and "/" not in n)
    out = []
    for name in names[-MAX_SIDE_EVENTS:]:
        try:
            data = json.loads(
                runner.read_from(posixpath.join(folder.events, name), 0, MAX_EVENT_BYTES) or b""
            )
        except (ValueError, OSError):
            continue
        if (event := clean(data)) is not None:
            out.append(event)
    return out


def build(info: jd.ClusterRecord | None, extra: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every known moment of the job, oldest first: {"at", "event", "node", "detail"}."""
    out: list[dict[str, Any]] = list(extra)
    if info is not None:
        start = f"start {info.restart_count}" if info.restart_count else ""
        for key, event in PHASES.items():
            at = getattr(info, key)
            if at is not None:
                out.append({"at": at, "event": event, "node": "", "detail": start})
        for n in info.nodes:
            if n.joined_at is not None:
                gen = f"generation {n.generation}" if n.generation else ""
                out.append(
                    {"at": n.joined_at, "event": "node_joined", "node": n.hostname or n.ip, "detail": gen}
                )
        out += [e for e in map(clean, info.events) if e is not None]
    return sorted(out, key=lambda e: e.get("at") or 0)


def lines(events: list[dict[str, Any]]) -> list[str]:
    """`HH:MM:SS.s  +SECONDS  event  node  detail`: seconds from the first event."""
    if not events:
        return ["(no timeline: the job has not written its records yet)"]
    first = events[0]["at"] or 0
    out = []
    for e in events:
        at = e.get("at") or 0
        stamp = time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 10) % 10}"
        text = f"{stamp}  {at - first:+8.1f}s  {e.get('event', '?'):<14} {e.get('node', ''):<10} {e.get('detail', '')}"
        out.append(text.rstrip())
    return out
