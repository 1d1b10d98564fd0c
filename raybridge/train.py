"""Ray Train helpers for raybridge clusters. Users keep writing normal Ray Train code; these remove the
boilerplate that makes it survive node loss, time limits and requeues:

    from raybridge import train as rbt

    def loop(config):
        state = rbt.load() or {"step": 0}          # newest complete checkpoint, or None
        ...
        for step in range(state["step"], total):
            ...
            stop = rbt.preempted(step)              # same answer on every rank at this step
            if (step + 1) % every == 0 or stop:
                rbt.save({"step": step + 1, "model": model.state_dict(), ...}, {"loss": loss})
                if stop:
                    return                          # the job is about to be requeued

    rbt.make_trainer(loop, {"total": 600}).fit()

Run names are stable across requeues of the same job (<job name>-<job id>), so a requeued job resumes
the same run instead of starting over. Checkpoints live on shared storage: <shared_dir>/runs/<run>.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raybridge.jobdir import JobDir, add_event
from raybridge.layout import CHECKPOINT_MARKER, SharedDir
from raybridge.settings import JOB_DIR_VAR, env_name

RUN_NAME_VAR = "RAYBRIDGE_RUN_NAME"  # `raybridge run --resume RUN` sets it: continue that run
MARKER = CHECKPOINT_MARKER  # written last: a checkpoint without it is incomplete
STATE = "state.pt"


def run_name() -> str:
    """The training run's name: `--resume`'s, else the trainer's own inside a training worker (a worker
    on a node added by `raybridge scale` runs in another Slurm job), else <job name>-<job id>."""
    if os.environ.get(RUN_NAME_VAR):
        return os.environ[RUN_NAME_VAR]
    if "ray.train" in sys.modules:
        with contextlib.suppress(Exception):  # the driver, or a Ray without it: the names below
            name = sys.modules["ray.train"].get_context().get_experiment_name()
            if name:
                return str(name)
    if os.environ.get("RAYBRIDGE_CLUSTER_JOB"):  # a member job's node: the cluster's job
        name = (os.environ.get("SLURM_JOB_NAME") or "run").removesuffix("-member")
        return f"{name}-{os.environ['RAYBRIDGE_CLUSTER_JOB']}"
    job = os.environ.get("SLURM_JOB_ID", "local")
    return f"{os.environ.get('SLURM_JOB_NAME') or 'run'}-{job}"


def storage_path() -> str:
    if os.environ.get("RAYBRIDGE_STORAGE"):
        return os.environ["RAYBRIDGE_STORAGE"]
    shared = os.environ.get(env_name("shared_dir"))
    if not shared:
        raise RuntimeError(
            "RAYBRIDGE_SHARED_DIR is not set: run inside a raybridge job or set RAYBRIDGE_STORAGE"
        )
    return SharedDir(shared).runs


def default_workers() -> int:
    return int(os.environ.get(env_name("train_workers")) or os.environ.get(env_name("nodes")) or 1)


def make_trainer(
    train_loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any] | None = None,
    *,
    num_workers: int | tuple[int, int] | None = None,
    cpus_per_worker: float | None = None,
    use_gpu: bool | None = None,
    max_failures: int = 3,
    num_to_keep: int = 3,
    name: str | None = None,
    storage: str | None = None,
    placement_strategy: str = "SPREAD",
    resize_check_s: float | None = None,
    preload: tuple[str, ...] | None = None,
) -> Any:
    """A TorchTrainer on shared storage with a requeue-stable run name and failure handling.
    One worker per training node by default; gloo on CPU, NCCL on GPU (follows the allocation).
    num_workers=(min, max): elastic (Ray Train V2): starts with what fits, grows when nodes join (e.g.
    `raybridge scale --add`), checked every resize_check_s (Ray's default: 60 s).
    preload: modules each worker process imports before it takes work (default: the profile's
    `preload`, Ray Train with torch); the idle worker each node keeps for the next worker group after
    a lost node has them imported already. () starts workers as Ray does."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu is None:
        use_gpu = int(os.environ.get(env_name("gpus_per_node")) or 0) > 0
    cpus = cpus_per_worker or float(os.environ.get(env_name("cpus_per_worker")) or 1)
    elastic = {}
    if isinstance(num_workers, tuple) and resize_check_s:
        elastic["elastic_resize_monitor_interval_s"] = resize_check_s
    return TorchTrainer(
        train_loop,
        train_loop_config=dict(config or {}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers or default_workers(),
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus},
            placement_strategy=placement_strategy,  # one worker per node where possible
            **elastic,
        ),
        run_config=RunConfig(
            worker_runtime_env=worker_runtime_env(preload),
            name=name or run_name(),
            storage_path=storage or storage_path(),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
    )


def worker_runtime_env(preload: tuple[str, ...] | None = None) -> dict[str, str]:
    """The training workers' runtime env: started through raybridge.preload when there is anything to
    import first (Ray's `py_executable`: a Python with arguments)."""
    from raybridge.preload import command
    from raybridge.settings import DEFAULTS

    if preload is None:
        raw = os.environ.get(env_name("preload"))
        preload = tuple(shlex.split(raw)) if raw is not None else DEFAULTS["preload"]
    return {"py_executable": command(sys.executable, tuple(preload))} if preload else {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint_dir(folder: Path, state: dict[str, Any]) -> None:
    """state.pt, then the marker with its sha256: the marker exists only if the state is whole."""
    import torch

    torch.save(state, folder / STATE)
    meta = {"sha256": _sha256(folder / STATE), "step": state.get("step"), "epoch": state.get("epoch")}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, folder / MARKER)


def marked_sha256(text: str) -> str | None:
    """The state's sha256 that a completion marker's text names; None for anything else."""
    try:
        digest = json.loads(text)["sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def is_complete(folder: Path, state_sha256: str | None = None) -> bool:
    """The marker is there and names the state's sha256 (state_sha256: already known, e.g. hashed as
    it was copied; else read and hashed here)."""
    try:
        marked = marked_sha256((folder / MARKER).read_text())
        return marked is not None and (state_sha256 or _sha256(folder / STATE)) == marked
    except OSError:
        return False


def read_checkpoint_dir(folder: Path) -> dict[str, Any]:
    """The saved state: tensors, state dicts and plain containers only (torch's weights_only). Shared
    storage is written by others too, and a full unpickle would run whatever they planted."""
    import pickle

    import torch

    try:
        return torch.load(folder / STATE, weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["?"])[0][:200]
        raise CheckpointError(
            f"{folder / STATE} holds objects other than tensors and plain containers; raybridge loads "
            f"only those ({first})"
        ) from None


class CheckpointError(RuntimeError):
    """A checkpoint or run folder raybridge will not load from."""


def check_private(folder: Path) -> None:
    """Refuse a folder that another user owns or can write to: what is in it could be anyone's."""
    st = folder.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"{folder} is a symbolic link; raybridge loads checkpoints only from a real folder"
        )
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise CheckpointError(
            f"{folder} can be written by other users (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); "
            f"raybridge will not load checkpoints from it: chmod go-w it (or set RAYBRIDGE_STORAGE)"
        )


def save(state: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
    """Report metrics and a checkpoint of state (rank 0 writes it; every rank must call this)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    metrics = dict(metrics or {})
    metrics.setdefault("step", state.get("step"))
    with tempfile.TemporaryDirectory(prefix="rb-ckpt-") as d:
        checkpoint = None
        if rank == 0:
            write_checkpoint_dir(Path(d), state)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def load() -> dict[str, Any] | None:
    """The newest complete checkpoint of this run: Ray Train's own (after a worker restart), else the
    newest complete one on shared storage (after a requeue); incomplete ones are skipped."""
    import ray.train

    run_dir = Path(storage_path()) / run_name()
    if run_dir.exists():
        check_private(run_dir)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if is_complete(Path(d)):
                return _restored(read_checkpoint_dir(Path(d)), "Ray Train's checkpoint")
    for folder in checkpoints_newest_first(run_dir):
        if is_complete(folder):
            check_private(folder)
            return _restored(read_checkpoint_dir(folder), f"{folder.name} on shared storage")
    return None


def _restored(state: dict[str, Any], source: str) -> dict[str, Any]:
    """On the job's timeline (`raybridge status --timeline`): once per restore, by world rank 0."""
    import ray.train

    job_dir = os.environ.get(JOB_DIR_VAR)
    if job_dir and ray.train.get_context().get_world_rank() == 0:
        add_event(
            JobDir(job_dir),
            "restored",
            socket.gethostname().split(".")[0],
            f"step {state.get('step')} from {source}",
        )
    return state


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(
        (p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")),
        key=lambda p: p.name,
        reverse=True,
    )


PREEMPT_CHECK_S = 0.5  # how often to look; Slurm warns minutes ahead (--signal-before)


@dataclass
class _Preempt:
    seen: bool = False  # this process saw the flag file
    checked_at: float = -1e9
    agreed: bool = False  # every rank knows, from the same step on
    next_step: int | None = None  # the step of the next agreement
    last: tuple[float, int] | None = None  # (time, step) of the last agreement


_preempt = _Preempt()


def _flag_seen() -> bool:
    """This process's view: the job folder's flag, looked at most every PREEMPT_CHECK_S."""
    now = time.monotonic()
    if not _preempt.seen and now - _preempt.checked_at >= PREEMPT_CHECK_S:
        _preempt.checked_at = now
        job_dir = os.environ.get(JOB_DIR_VAR)
        _preempt.seen = bool(job_dir) and Path(JobDir(job_dir).preempt).exists()
    return _preempt.seen


def preempted(step: int | None = None) -> bool:
    """True once Slurm warned of the time limit or preemption: save now and return from the loop.

    In a training loop pass the step, and call it at the same point of every step on every rank: the
    ranks then agree (one small all-reduce about every PREEMPT_CHECK_S) and turn true at the same step,
    so they all reach the checkpoint's collective together. Without step: this process's own view."""
    import torch.distributed as dist

    if step is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _preempt.agreed or _flag_seen()
    p = _preempt
    if p.agreed or (p.next_step is not None and step < p.next_step):
        return p.agreed
    import torch

    now = time.monotonic()
    per_step = (now - p.last[0]) / max(step - p.last[1], 1) if p.last else 0.0
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    votes = torch.tensor([float(_flag_seen()), per_step], dtype=torch.float64, device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    p.agreed = bool(votes[0].item())
    # Every rank derives the next check from the same agreed numbers, so they stay in step.
    slowest = float(votes[1].item())
    p.next_step = step + (min(max(int(PREEMPT_CHECK_S / slowest), 1), 10_000) if slowest > 0 else 1)
    p.last = (now, step)
    return p.agreed
