"""Bring-up benchmark: sbatch → all N Ray nodes alive, raybridge vs two baselines, side by side.

Run through scripts/bench-bringup (it starts the test bed and runs this on the login node).

Baselines, on the same cluster and the same nodes, in the same rounds:
  symmetric-run  `ray symmetric-run --address HEAD:6379 --min-nodes N` on every node (ships with Ray)
  ray-docs       the protocol of Ray's documented slurm-basic.sh: head via srun, sleep 10 s, then one
                 srun per worker with a 5 s sleep after each, then the driver
Every contender's clock starts just before `sbatch` and stops when a driver on the head sees all N nodes
alive (raybridge: the head's ready_at timestamp, taken at that moment). All on one machine clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raybridge.cluster import submit
from raybridge.profile import load_spec
from raybridge.runner import LocalRunner

ALIVE_PROBE = """
import json, sys, time, ray
n = int(sys.argv[1]); out = sys.argv[2]
ray.init(address=sys.argv[3] if len(sys.argv) > 3 else None, logging_level="ERROR")
while sum(1 for x in ray.nodes() if x["Alive"]) < n:
    time.sleep(0.05)
json.dump({"ready_at": time.time()}, open(out, "w"))
"""

SYMMETRIC = """#!/bin/bash
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --output={out}.log
{setup}
head_ip=$(getent hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" | awk '{{print $1}}')
srun --nodes={n} --ntasks-per-node=1 ray symmetric-run --address "$head_ip:6379" --min-nodes {n} \\
  --num-cpus=2 --object-store-memory=300000000 -- python {probe} {n} {out}
"""

RAY_DOCS = """#!/bin/bash
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --output={out}.log
{setup}
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${{nodes[0]}}
head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head" hostname --ip-address)
srun --overlap --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port=6379 \\
  --num-cpus=2 --object-store-memory=300000000 --block &
sleep 10
for ((i = 1; i < {n}; i++)); do
  srun --overlap --nodes=1 --ntasks=1 -w "${{nodes[$i]}}" ray start --address "$head_ip:6379" \\
    --num-cpus=2 --object-store-memory=300000000 --block &
  sleep 5
done
python {probe} {n} {out} "$head_ip:6379"
"""


def wait_file(path: Path, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear")


def wait_gone(job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not end")


RAY_NAMES = ("raylet", "gcs_server")
RAY_CMD_PARTS = (
    "ray/dashboard",
    "default_worker.py",
    "ray/autoscaler",
    "log_monitor.py",
    "runtime_env/agent",
)


def sweep() -> int:
    """Kill Ray processes that outlived their job (the test bed shares one PID namespace); count them."""
    import psutil

    stray = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] in RAY_NAMES or any(part in cmd for part in RAY_CMD_PARTS):
            stray.append(p)
    for p in stray:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(stray, timeout=5)
    return len(stray)


def run_baseline(template: str, n: int, workdir: Path, setup: str, probe: Path, tag: str) -> float:
    out = workdir / f"{tag}-{n}-{time.time_ns()}.json"
    script = workdir / f"{tag}.sbatch"
    script.write_text(template.format(n=n, out=out, setup=setup, probe=probe))
    t0 = time.time()
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
    job_id = job.stdout.strip().split(";")[0]
    try:
        ready = wait_file(out)["ready_at"]
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
        wait_gone(job_id)
    return ready - t0


def run_raybridge(n: int, profile: str) -> float:
    spec = load_spec(profile, nodes=n, job_name="bench-raybridge")
    runner = LocalRunner()
    t0 = time.time()
    cluster = submit(spec, runner)
    try:
        info = cluster.wait_ready(timeout=300)
    finally:
        cluster.stop()
        wait_gone(cluster.job_id)
    return info["ready_at"] - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--nodes", default="1,2,3,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-ray-docs", action="store_true", help="the documented protocol is slow by design")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    spec = load_spec(args.profile)
    setup = "\n".join(spec.setup)
    Path(spec.shared_dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=spec.shared_dir))
    probe = workdir / "alive_probe.py"
    probe.write_text(ALIVE_PROBE)
    counts = [int(x) for x in args.nodes.split(",")]
    names = ["raybridge", "symmetric-run"] + ([] if args.skip_ray_docs else ["ray-docs"])
    results: dict[str, dict[int, list[float]]] = {name: {n: [] for n in counts} for name in names}
    leftovers = dict.fromkeys(names, 0)
    sweep()
    for r in range(args.runs):
        for n in counts:
            for name in names:  # interleaved, so drift in machine load hits all contenders alike
                if name == "raybridge":
                    t = run_raybridge(n, args.profile)
                elif name == "symmetric-run":
                    t = run_baseline(SYMMETRIC, n, workdir, setup, probe, "symmetric")
                else:
                    t = run_baseline(RAY_DOCS, n, workdir, setup, probe, "raydocs")
                results[name][n].append(t)
                leftovers[name] += sweep()
                print(f"round {r + 1}/{args.runs}  N={n}  {name:14} {t:6.2f} s", file=sys.stderr, flush=True)
    med = {name: {n: statistics.median(v) for n, v in per.items()} for name, per in results.items()}
    header = f"{'N':>2} | {'raybridge':>10} | {'symmetric-run':>13} | {'ratio':>6}"
    if "ray-docs" in med:
        header += f" | {'ray-docs':>9} | {'ratio':>6}"
    print(
        f"Bring-up, sbatch → all N nodes alive, median of {args.runs} runs (seconds; ratio = raybridge / baseline)"
    )
    print(header)
    print("-" * len(header))
    for n in counts:
        rb, sym = med["raybridge"][n], med["symmetric-run"][n]
        row = f"{n:>2} | {rb:10.2f} | {sym:13.2f} | {rb / sym:6.2f}"
        if "ray-docs" in med:
            row += f" | {med['ray-docs'][n]:9.2f} | {rb / med['ray-docs'][n]:6.2f}"
        print(row)
    first, last = med["raybridge"][counts[0]], med["raybridge"][counts[-1]]
    print(
        "Ray processes left running after the job ended (killed by the benchmark): "
        + ", ".join(f"{k} {v}" for k, v in leftovers.items())
    )
    print(f"raybridge scaling: {counts[-1]} nodes / {counts[0]} node = {last / first:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
