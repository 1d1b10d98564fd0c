"""Continuing a training in the next allocation: `run --chain` (the next job queued behind this one)
vs `run --requeue` (the same job requeued), side by side. Each round runs both: a training that the
time-limit signal (USR1, sent as Slurm sends it) stops mid-run, and that finishes in the next allocation.
Measured: signal → first completed step in the next allocation, with its parts.

Runs as the test bed's user (scripts/bench-chain starts it).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_report
from bench_common import events, high_water, result

RAYBRIDGE = "/srv/rbtb/opt/venv/bin/raybridge"


def one(profile: str, shared: Path, example: str, how: str, steps: int) -> dict:
    mode = ["--requeue"] if how == "requeue" else ["--chain", "2", "--no-requeue"]
    argv = [
        RAYBRIDGE,
        "run",
        "--nodes",
        "2",
        "--profile",
        profile,
        "--time",
        "10",
        "--signal-before",
        "60",
        *mode,
    ]
    argv += ["--", "python", example, "--steps", str(steps), "--every", str(steps), "--workers", "2"]
    argv += ["--step-sleep", "0.05"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    while job is None:
        m = re.search(r"submitted job (\d+)", p.stderr.readline())
        job = m.group(1) if m else None
    run = shared / "runs" / f"raybridge-{job}"
    while high_water(run) < 40:
        if p.poll() is not None:
            raise RuntimeError(f"job {job} ended early:\n" + p.stderr.read()[-3000:])
        time.sleep(0.05)
    t_sig = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    out, err = p.communicate(timeout=600)
    res = result(out)
    ev = [e for e in events(run) if e["t"] > t_sig]
    start = next(e["t"] for e in ev if e["event"] == "loop_start")
    first = next(e["t"] for e in ev if e["event"] == "first_step")
    if res["final_step"] != steps or res["restores"] != 1:
        raise RuntimeError(f"{how}: unexpected result {res}")
    return {"signal_to_new_loop_s": start - t_sig, "signal_to_first_step_s": first - t_sig}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--shared", required=True, help="the profile's shared_dir")
    ap.add_argument("--example", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {"chain": [], "requeue": []}
    for i in range(args.runs):
        for how in ("chain", "requeue") if i % 2 == 0 else ("requeue", "chain"):
            rows[how].append(one(args.profile, Path(args.shared), args.example, how, args.steps))
            print(f"round {i + 1}/{args.runs} {how}: {rows[how][-1]}", file=sys.stderr, flush=True)
    med = {how: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for how, rs in rows.items()}
    print(f"Continuing in the next allocation after the time-limit signal, 2 nodes, median of {args.runs}")
    print(f"  {'':34} {'run --chain':>12} {'run --requeue':>14}")
    for key, label in (
        ("signal_to_new_loop_s", "signal → training loop started"),
        ("signal_to_first_step_s", "signal → first completed step"),
    ):
        print(f"  {label:34} {med['chain'][key]:10.1f} s {med['requeue'][key]:12.1f} s")
    ratio = med["chain"]["signal_to_first_step_s"] / med["requeue"]["signal_to_first_step_s"]
    print(f"  chain / requeue                    {ratio:10.2f}")
    bench_report.save(
        "bench-chain",
        f"Signal → first step in the next allocation (median of {args.runs})",
        "seconds (lower is better)",
        {"signal → first step": {h: med[h]["signal_to_first_step_s"] for h in med}},
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
