"""Containers vs bare metal, side by side on the same nodes: bring-up (submit → every node joined) and
training throughput, raybridge run as a user (alice) with and without Charliecloud.

Runs as the test bed's user (scripts/bench-container starts it). Interleaved rounds: each round runs the
bare and the container case back to back, so drift on the shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

import bench_report
from bench_common import result

RAYBRIDGE = "/srv/rbtb/opt/venv/bin/raybridge"


def bring_up(profile: str, nodes: int) -> float:
    r = subprocess.run(
        [RAYBRIDGE, "up", "--nodes", str(nodes), "--profile", profile, "--timeout", "180"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    m = re.search(r"Ray cluster ready: job (\d+), \d+ nodes, ([0-9.]+)s from submission", r.stdout)
    if not m:
        raise RuntimeError(f"up failed:\n{r.stderr[-3000:]}")
    subprocess.run([RAYBRIDGE, "down", m.group(1), "--profile", profile], capture_output=True, timeout=300)
    return float(m.group(2))


def train(profile: str, nodes: int, steps: int, example: str) -> float:
    argv = [RAYBRIDGE, "run", "--nodes", str(nodes), "--profile", profile, "--", "python", example]
    argv += ["--steps", str(steps), "--every", str(steps), "--threads", "1", "--workers", str(nodes)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    return result(r.stdout)["steady_samples_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bare", required=True, help="profile without a container")
    ap.add_argument("--container", required=True, help="the same profile with container:")
    ap.add_argument("--example", required=True)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    up_bare, up_ct, tr_bare, tr_ct = [], [], [], []
    for i in range(args.runs):
        up_bare.append(bring_up(args.bare, args.nodes))
        up_ct.append(bring_up(args.container, args.nodes))
        tr_bare.append(train(args.bare, args.nodes, args.steps, args.example))
        tr_ct.append(train(args.container, args.nodes, args.steps, args.example))
        print(
            f"round {i + 1}/{args.runs}: bring-up bare {up_bare[-1]:.1f}s, container {up_ct[-1]:.1f}s; "
            f"training bare {tr_bare[-1]:.0f}, container {tr_ct[-1]:.0f} samples/s",
            file=sys.stderr,
            flush=True,
        )
    med = statistics.median
    print(f"Containers (Charliecloud) vs bare, {args.nodes} nodes, median of {args.runs} interleaved rounds")
    print(f"  bring-up, submit -> all nodes joined   bare {med(up_bare):6.1f} s   container {med(up_ct):6.1f} s"
          f"   ratio {med(up_ct) / med(up_bare):.2f} (goal <= 1.2)")  # fmt: skip
    print(f"  training throughput (samples/s)        bare {med(tr_bare):6.0f}     container {med(tr_ct):6.0f}  "
          f"   ratio {med(tr_ct) / med(tr_bare):.2f} (goal >= 0.97)")  # fmt: skip
    per_round = sorted(c / b for c, b in zip(tr_ct, tr_bare, strict=True))
    print(f"  training, per-round ratios             median {med(per_round):.2f} "
          f"(range {per_round[0]:.2f}-{per_round[-1]:.2f}; each round runs both back to back)")  # fmt: skip
    bench_report.save(
        "bench-container",
        f"Charliecloud vs bare, {args.nodes} nodes (median of {args.runs})",
        "container / bare",
        {
            "container / bare": {
                "bring-up time": med(up_ct) / med(up_bare),
                "training samples/s": med(tr_ct) / med(tr_bare),
            }
        },
        {"up_bare": up_bare, "up_container": up_ct, "train_bare": tr_bare, "train_container": tr_ct},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
