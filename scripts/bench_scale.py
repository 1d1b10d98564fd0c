"""Scale-up benchmark: `raybridge scale --add 1` → the new node alive in the cluster, vs the same kind of
node in the cluster's initial bring-up (`up --nodes 2`: its worker node), median of several runs.

Run through scripts/bench-scale (it starts the test bed and runs this on the login node). Times come from
the records the agents write (a node's `joined_at`: its raylet registered with the GCS) and the moment the
benchmark asked (sbatch / `scale --add`); Slurm's own queue time (sacct Submit → Start, 1-s resolution)
is reported separately and taken out of the ratio. Autoscaling through Ray's autoscaler is not measured:
raybridge has no Slurm node provider yet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime

import bench_report

from raybridge import jobdir as jd
from raybridge import members
from raybridge.cluster import submit
from raybridge.profile import load_spec
from raybridge.runner import LocalRunner


def queue_s(job_id: str) -> float:
    """Slurm's Submit → Start for a job (whole seconds)."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "Submit,Start"], capture_output=True, text=True
    )
    submit_at, start_at = out.stdout.strip().splitlines()[-1].split("|")
    return (datetime.fromisoformat(start_at) - datetime.fromisoformat(submit_at)).total_seconds()


def node_record(folder: jd.JobDir, key: str, timeout: float = 120) -> jd.NodeRecord:
    deadline = time.monotonic() + timeout
    while (rec := jd.read(folder.node(key), jd.NodeRecord)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"no node record {key} after {timeout}s")
        time.sleep(0.05)
    return rec


def one_run(profile: str) -> dict[str, float]:
    runner = LocalRunner()
    spec = load_spec(profile, nodes=2)
    c = submit(spec, runner)
    try:
        info = c.wait_ready(300)
        worker = next(n for n in info.nodes if n.ip != (info.head.ip if info.head else None))
        initial_total = (worker.joined_at or 0) - (info.submitted_at or 0)
        initial_queue = queue_s(c.job_id)
        asked = time.time()
        (member,) = members.add(c, spec, 1)
        rec = node_record(c.dir, f"m{member}-0")
        member_total = (rec.joined_at or 0) - asked
        member_queue = queue_s(member)
    finally:
        c.stop()
    return {
        "initial_total_s": initial_total,
        "initial_queue_s": initial_queue,
        "initial_start_s": initial_total - initial_queue,
        "member_total_s": member_total,
        "member_queue_s": member_queue,
        "member_start_s": member_total - member_queue,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        rows.append(one_run(args.profile))
        print(
            f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()),
            file=sys.stderr,
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"A node added to a running cluster vs the same node in the initial bring-up (median of {args.runs}, seconds)"
    )
    print(f"{'':34} | {'initial (up)':>12} | {'scale --add':>11}")
    print(f"{'asked → node alive':34} | {med['initial_total_s']:12.2f} | {med['member_total_s']:11.2f}")
    print(
        f"{'  of which Slurm queue (sacct, 1 s)':34} | {med['initial_queue_s']:12.2f} | {med['member_queue_s']:11.2f}"
    )
    print(f"{'  without the queue':34} | {med['initial_start_s']:12.2f} | {med['member_start_s']:11.2f}")
    ratio = med["member_start_s"] / med["initial_start_s"]
    print(f"ratio (without the queue): {ratio:.2f} (goal ≤ 1.5)")
    print("autoscaler demand → node alive: not measured (no Slurm node provider for Ray's autoscaler yet)")
    bench_report.save(
        "bench-scale",
        f"A node: initial bring-up vs scale --add (median of {args.runs})",
        "seconds (lower is better)",
        {
            "initial bring-up": {
                "asked → alive": med["initial_total_s"],
                "without queue": med["initial_start_s"],
            },
            "scale --add": {"asked → alive": med["member_total_s"], "without queue": med["member_start_s"]},
        },
        {"runs": rows, "median": med},
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
