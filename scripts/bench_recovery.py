"""Recovery after a node failure: kill -9 the raylet on a training node mid-run, then measure
  kill → new worker group started (failure detection + worker-group restart),
  → checkpoint loaded, → first completed step after the restore (the headline), and the work redone.
Runs on the test-bed host as root (scripts/bench-recovery): it needs to reach into a node's processes.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
from bench_common import REPO, result, train_run_argv

TESTBED = str(REPO / "scripts/testbed")


def events(run: Path) -> list[dict]:
    f = run / "events.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def high_water(run: Path) -> int:
    try:
        return json.loads((run / "progress.json").read_text())["high_water"]
    except (OSError, ValueError):
        return 0


def node_dead_at(job: str) -> float:
    """When the GCS on the head (n1) declared the killed node dead, from its log."""
    log = subprocess.run(
        [TESTBED, "exec", "n1", "--", "sh", "-c", f"cat /tmp/rb-{job}/session_latest/logs/gcs_server.out"],
        capture_output=True,
        text=True,
    ).stdout
    for line in log.splitlines():
        if "Node is dead because the health check failed" in line:
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", line)
            if stamp:  # the test bed's nodes share this machine's clock and time zone
                return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return float("nan")


def one_run(profile: str, shared: str, steps: int, every: int) -> dict:
    example = ("--steps", str(steps), "--every", str(every), "--workers", "2", "--step-sleep", "0.05")
    cmd = [TESTBED, "exec", "login", "--", *train_run_argv(profile, 3, *example)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    while job is None:
        m = re.search(r"submitted job (\d+)", p.stderr.readline())
        job = m.group(1) if m else None
    run = Path(shared) / "raybridge" / "runs" / f"raybridge-{job}"
    while high_water(run) < every + every // 2:
        if p.poll() is not None:
            raise RuntimeError(f"job {job} ended before the kill:\n" + p.stderr.read()[-3000:])
        time.sleep(0.05)
    victim = sorted(h.read_text() for h in (run / "hosts").glob("attempt0-rank*") if h.read_text() != "n1")[0]
    pids = subprocess.run(
        ["ip", "netns", "pids", f"rbtb-{victim}"], capture_output=True, text=True
    ).stdout.split()
    raylet = [psutil.Process(int(x)) for x in pids if psutil.Process(int(x)).name() == "raylet"]
    t_kill = time.time()
    lost_at = high_water(run)
    for r in raylet:
        r.kill()
    while not any(e["event"] == "loop_start" and e["t"] > t_kill for e in events(run)):
        if p.poll() is not None:
            raise RuntimeError(
                f"job {job} ended without restarting the training:\n" + p.stderr.read()[-3000:]
            )
        time.sleep(0.1)
    dead_at = node_dead_at(job)
    out, err = p.communicate(timeout=600)
    res = result(out)
    ev = [e for e in events(run) if e["t"] > t_kill]
    start = next(e["t"] for e in ev if e["event"] == "loop_start")
    restored = next(e for e in ev if e["event"] == "restored")
    first = next(e["t"] for e in ev if e["event"] == "first_step")
    return {
        "node_dead_s": dead_at - t_kill,
        "detect_and_restart_s": start - t_kill,
        "checkpoint_load_s": restored["t"] - start,
        "first_step_s": first - restored["t"],
        "total_s": first - t_kill,
        "redone_steps": lost_at - restored["step"],
        "final_step": res["final_step"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=40)
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        rows.append(one_run(args.profile, args.shared, args.steps, args.every))
        print(
            f"run {i + 1}/{args.runs}: "
            + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
            file=sys.stderr,
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"Recovery from kill -9 of a worker node's raylet, 3 nodes, 2 training workers, median of {args.runs}"
    )
    print(f"  failure detected + new worker group started  {med['detect_and_restart_s']:6.1f} s")
    print(f"    of which: node declared dead               {med['node_dead_s']:6.1f} s")
    print(f"  checkpoint loaded                            {med['checkpoint_load_s']:6.1f} s")
    print(f"  first step completed after restore           {med['first_step_s']:6.1f} s")
    print(f"  kill → first completed step (target ≤ 20 s)  {med['total_s']:6.1f} s")
    print(f"  steps redone (checkpoint every {args.every})           {med['redone_steps']:6.0f}")
    print(f"  final step                                    {med['final_step']:6.0f} of {args.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
