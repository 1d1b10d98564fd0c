"""What this node may use, from what Slurm granted (never more)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

MIN_OBJECT_STORE = 80 * 1024**2  # Ray refuses less than ~75 MB


@dataclass(frozen=True)
class NodeResources:
    cpus: int
    gpu_ids: tuple[str, ...]
    memory_bytes: int
    object_store_bytes: int


def cpus(env: Mapping[str, str]) -> int:
    for key in ("SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_JOB_CPUS_PER_NODE"):
        value = env.get(key, "")
        digits = value.split("(")[0].split(",")[0]  # "4(x2),2" → 4
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return os.cpu_count() or 1


def gpu_ids(env: Mapping[str, str]) -> tuple[str, ...]:
    """GPU ids visible to this job on this node. Slurm says 'NoDevFiles' when the node has GRES
    configured but the job got none; ids may be indices or UUIDs."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        if cvd.strip() in ("", "NoDevFiles", "-1"):
            return ()
        return tuple(x.strip() for x in cvd.split(",") if x.strip())
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(key):
            return tuple(x.strip() for x in env[key].split(",") if x.strip())
    count = env.get("SLURM_GPUS_ON_NODE", "")
    if count.isdigit():
        return tuple(str(i) for i in range(int(count)))
    return ()


def memory_bytes(env: Mapping[str, str]) -> int:
    total = psutil.virtual_memory().total
    if env.get("SLURM_MEM_PER_NODE", "").isdigit():
        return min(total, int(env["SLURM_MEM_PER_NODE"]) * 1024**2)
    if env.get("SLURM_MEM_PER_CPU", "").isdigit():
        return min(total, int(env["SLURM_MEM_PER_CPU"]) * 1024**2 * cpus(env))
    return total


def object_store_bytes(memory: int, fraction: float, shm: str = "/dev/shm") -> int:
    want = int(memory * fraction)
    with contextlib.suppress(OSError):
        want = min(want, int(shutil.disk_usage(shm).free * 0.8))
    return max(want, MIN_OBJECT_STORE)


def detect(
    env: Mapping[str, str], object_store_fraction: float = 0.3, gpus_per_node: int | None = None
) -> NodeResources:
    """What Ray may use on this node: Slurm's grant from the environment; gpus_per_node (the
    profile's) names GPUs only where Slurm did not say which."""
    mem = memory_bytes(env)
    ids = gpu_ids(env)
    if not ids and gpus_per_node and "CUDA_VISIBLE_DEVICES" not in env:
        ids = tuple(str(i) for i in range(gpus_per_node))
    return NodeResources(cpus(env), ids, mem, object_store_bytes(mem, object_store_fraction))
