"""A small but real distributed training job: an MLP learns a fixed random function (synthetic data),
DDP over Ray Train workers (gloo on CPU, NCCL on GPU), checkpoint every `every` steps.

    raybridge run --nodes 3 -- python examples/train_mlp.py --steps 300 --every 50

It survives a lost node (Ray Train restarts the worker group from the newest checkpoint) and a time
limit / preemption (saves at once, the job is requeued, the same run resumes). At the end it prints one
JSON line starting with RESULT: final step, steps redone, restores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import psutil
import ray.train
import ray.train.torch
import torch
from torch import nn

from raybridge import train as rbt


def make_data(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return x, torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)


def make_model(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))


def train_loop(config: dict) -> None:
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = ray.train.torch.prepare_model(make_model(config["dim"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    progress = Path(rbt.storage_path()) / rbt.run_name() / "progress.json"  # survives restarts
    events = progress.parent / "events.jsonl"  # timestamps for scripts/bench-recovery
    progress.parent.mkdir(parents=True, exist_ok=True)
    note(events, rank, "loop_start")
    state = rbt.load()
    start, history = 0, {"redone": 0, "restores": 0, "starts": []}
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        history["restores"] += 1
        reached = json.loads(progress.read_text())["high_water"] if progress.exists() else start
        history["redone"] += max(0, reached - start)  # steps done after the checkpoint, lost
        if rank == 0:
            print(f"resumed from step {start} ({max(0, reached - start)} steps redone)", flush=True)
        note(events, rank, "restored", step=start)
    history["starts"].append(start)
    high_water = HighWater(progress) if rank == 0 else None
    # Where this attempt's workers run (tests check that a spare node took over).
    hosts = progress.parent / "hosts"
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / f"attempt{history['restores']}-rank{rank}").write_text(socket.gethostname())
    # ... and when the worker process started (a warm one started before the node was lost).
    procs = progress.parent / "procs"
    procs.mkdir(exist_ok=True)
    started = psutil.Process().create_time()
    (procs / f"attempt{history['restores']}-rank{rank}").write_text(json.dumps({"started": started}))
    x, y = make_data(config["samples"], config["dim"], seed=1)
    shard = slice(rank, None, world)  # each worker its own slice of the data
    x, y = x[shard], y[shard]
    batch = config["batch"]
    loss_fn = nn.MSELoss()
    t0, done = time.perf_counter(), 0
    steady_t0, steady_steps = None, 0  # throughput after a 10-step warm-up (scripts/bench-train)
    for step in range(start, config["steps"]):
        if step - start == 10:
            steady_t0 = time.perf_counter()
        i = (step * batch) % max(1, len(x) - batch)
        opt.zero_grad()
        loss = loss_fn(model(x[i : i + batch]), y[i : i + batch])
        loss.backward()
        opt.step()
        done += 1
        if steady_t0 is not None:
            steady_steps += 1
        if high_water:
            high_water.record(step + 1)
            if step == start:
                note(events, rank, "first_step", step=step + 1)
        if config.get("step_sleep"):
            time.sleep(config["step_sleep"])  # lets tests act part-way on a fast machine
        last = step + 1 == config["steps"]
        # The same answer on every rank at this step (raybridge's flag, or Ray Train's drain notice).
        stop = ray_preempted(step, rank, events) if config.get("ray_preemption") else rbt.preempted(step)
        if (step + 1) % config["every"] == 0 or last or stop:
            elapsed = time.perf_counter() - t0
            rbt.save(
                {
                    "step": step + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "history": history,
                },
                {
                    "loss": float(loss),
                    "samples_per_s": done * batch * world / max(elapsed, 1e-9),
                    "steady_samples_per_s": steady_steps * batch * world / (time.perf_counter() - steady_t0)
                    if steady_t0 and steady_steps
                    else None,
                    "restores": history["restores"],
                    "redone": history["redone"],
                },
            )
            t0, done = time.perf_counter(), 0
            if stop and not last:
                return


def ray_preempted(step: int, rank: int, events: Path) -> bool:
    """Ray Train's own view (Ray >= 2.60): Ray's drain notice for a node of this run. raybridge gives it on
    Slurm's USR1, with the time left as its deadline. Every rank asks at the same steps (it is a barrier)."""
    if step % 5:
        return False
    info = ray.train.get_preemption_info()
    if info is None:
        return False
    if rank == 0:
        left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else None
        print(
            f"Ray's preemption notice at step {step + 1}: {len(info.preempted_node_ids)} nodes, "
            + (f"deadline in {left:.0f}s" if left is not None else "no deadline"),
            flush=True,
        )
        note(events, rank, "ray_preemption", step=step + 1, deadline_ms=info.deadline_ms)
    return True


class HighWater:
    """The furthest step reached, across restarts (to count redone work). One fixed-size pwrite per
    step on a held descriptor: no open/rename per step, which would cost a visible share of a short
    step on shared storage. Readers see either the old or the new record."""

    SIZE = 64

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def record(self, step: int) -> None:
        text = json.dumps({"high_water": step, "t": round(time.time(), 3)}).ljust(self.SIZE - 1) + "\n"
        os.pwrite(self.fd, text.encode(), 0)


def note(events: Path, rank: int, event: str, **fields: object) -> None:
    if rank == 0:
        with open(events, "a") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50, help="checkpoint interval in steps")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--elastic", default=None, help="MIN,MAX workers: grow when nodes join (raybridge scale)")
    ap.add_argument("--resize-check", type=float, default=None, help="seconds between elastic resize checks")
    ap.add_argument("--max-failures", type=int, default=3)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = Ray's choice)")
    ap.add_argument(
        "--ray-preemption",
        action="store_true",
        help="save and stop on Ray Train's preemption notice (ray.train.get_preemption_info) alone",
    )
    args = ap.parse_args()
    config = {k: getattr(args, k) for k in ("steps", "every", "batch", "samples", "dim")}
    config["step_sleep"] = args.step_sleep
    config["threads"] = args.threads
    config["ray_preemption"] = args.ray_preemption
    t0 = time.time()
    workers = tuple(int(x) for x in args.elastic.split(",")) if args.elastic else args.workers
    result = rbt.make_trainer(
        train_loop,
        config,
        num_workers=workers,
        max_failures=args.max_failures,
        resize_check_s=args.resize_check,
    ).fit()
    metrics = result.metrics or {}
    summary = {
        "run": rbt.run_name(),
        "final_step": metrics.get("step"),
        "restores": metrics.get("restores"),
        "redone_steps": metrics.get("redone"),
        "samples_per_s": metrics.get("samples_per_s"),
        "steady_samples_per_s": metrics.get("steady_samples_per_s"),
        "wall_s": round(time.time() - t0, 1),
        "preempted": rbt.preempted() and metrics.get("step") != args.steps,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "job": os.environ.get("SLURM_JOB_ID"),
    }
    print("RESULT: " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
