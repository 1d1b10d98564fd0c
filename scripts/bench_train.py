"""Training throughput: raybridge's TorchTrainer vs plain `srun torchrun` DDP, same nodes, model, batch.

Runs on the login node (scripts/bench-train starts it). Interleaved rounds; each side reports samples/s
over the steps after a 10-step warm-up (no checkpoints inside the measured window).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_report
from bench_common import REPO, result, train_run_argv

TORCHRUN = """#!/bin/bash
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --output={out}
{setup}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# Rendezvous by host name (torchrun decides who hosts the store by it); the gradients go over ib0.
export GLOO_SOCKET_IFNAME=ib0
srun torchrun --nnodes={n} --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint="$head:29511" \\
  --rdzv-id="$SLURM_JOB_ID" {repo}/examples/train_mlp_torchrun.py --steps {steps} --threads 1
"""


def run_raybridge(profile: str, n: int, steps: int) -> float:
    r = subprocess.run(
        train_run_argv(
            profile,
            n,
            *["--steps", str(steps), "--every", str(steps), "--threads", "1", "--workers", str(n)],
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result(r.stdout)["steady_samples_per_s"]


def run_torchrun(setup: str, workdir: Path, n: int, steps: int) -> float:
    out = workdir / f"torchrun-{time.time_ns()}.out"
    script = workdir / "torchrun.sbatch"
    script.write_text(TORCHRUN.format(n=n, out=out, setup=setup, repo=REPO, steps=steps))
    subprocess.run(["sbatch", "--wait", "--quiet", str(script)], check=True, timeout=600)
    return result(out.read_text())["steady_samples_per_s"]


def main() -> int:
    from raybridge.client.profile import load_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)  # ~6 s measured per run
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    spec = load_spec(args.profile)
    workdir = Path(spec.shared_dir) / "bench-train"
    workdir.mkdir(parents=True, exist_ok=True)
    setup = "\n".join(spec.setup)
    rb, tr = [], []
    for i in range(args.runs):
        rb.append(run_raybridge(args.profile, args.nodes, args.steps))
        tr.append(run_torchrun(setup, workdir, args.nodes, args.steps))
        print(
            f"round {i + 1}/{args.runs}: raybridge {rb[-1]:.0f} samples/s, torchrun {tr[-1]:.0f} samples/s "
            f"(ratio {rb[-1] / tr[-1]:.2f})",
            file=sys.stderr,
            flush=True,
        )
    a, b = statistics.median(rb), statistics.median(tr)
    ratios = sorted(x / y for x, y in zip(rb, tr, strict=True))
    print(
        f"Training throughput, {args.nodes} nodes x 1 worker, MLP, batch 256/worker, gloo over ib0, "
        f"median of {args.runs} runs"
    )
    print(f"  raybridge TorchTrainer  {a:9.0f} samples/s")
    print(f"  srun torchrun (DDP)     {b:9.0f} samples/s")
    print(f"  ratio of medians        {a / b:9.2f}")
    print(
        f"  per-round ratios        {statistics.median(ratios):9.2f} median "
        f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}; each round runs both back to back)"
    )
    bench_report.save(
        "bench-train",
        f"Training throughput, {args.nodes} nodes (median of {args.runs})",
        "samples/s (higher is better)",
        {"raybridge TorchTrainer": {"MLP": a}, "srun torchrun (DDP)": {"MLP": b}},
        {"raybridge": rb, "torchrun": tr},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
