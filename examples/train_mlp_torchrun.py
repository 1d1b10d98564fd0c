"""The same model, data and batch as train_mlp.py, as plain torch DDP under torchrun: the baseline for
scripts/bench-train (no Ray, no checkpoints)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_mlp import make_data, make_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(make_model(args.dim))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = make_data(args.samples, args.dim, seed=1)
    x, y = x[rank::world], y[rank::world]
    loss_fn = nn.MSELoss()
    t0 = None
    for step in range(args.steps):
        if step == 10:
            t0 = time.perf_counter()
        i = (step * args.batch) % max(1, len(x) - args.batch)
        opt.zero_grad()
        loss = loss_fn(model(x[i : i + args.batch]), y[i : i + args.batch])
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        rate = (args.steps - 10) * args.batch * world / elapsed
        print("RESULT: " + json.dumps({"steady_samples_per_s": rate, "final_loss": float(loss)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
