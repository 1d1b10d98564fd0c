"""Checkpoint integrity and naming helpers (pure file logic; torch on CPU)."""

import os
from pathlib import Path

import pytest

from raybridge import train as rbt


def test_run_name_is_stable_across_requeues(monkeypatch):
    monkeypatch.delenv("RAYBRIDGE_RUN_NAME", raising=False)
    monkeypatch.setenv("SLURM_JOB_NAME", "llm")
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = rbt.run_name()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the same job after two requeues
    assert rbt.run_name() == first == "llm-4711"
    monkeypatch.setenv("RAYBRIDGE_RUN_NAME", "mine")
    assert rbt.run_name() == "mine"


def test_storage_path(monkeypatch):
    monkeypatch.delenv("RAYBRIDGE_STORAGE", raising=False)
    monkeypatch.setenv("RAYBRIDGE_SHARED_DIR", "/lustre/p/rb")
    assert rbt.storage_path() == "/lustre/p/rb/runs"
    monkeypatch.delenv("RAYBRIDGE_SHARED_DIR")
    with pytest.raises(RuntimeError, match="RAYBRIDGE_SHARED_DIR"):
        rbt.storage_path()


def test_checkpoint_complete_only_with_matching_marker(tmp_path):
    oldest = tmp_path / "checkpoint_000000"
    oldest.mkdir()
    rbt.write_checkpoint_dir(oldest, {"step": 50})
    good = tmp_path / "checkpoint_000001"
    good.mkdir()
    rbt.write_checkpoint_dir(good, {"step": 100, "w": [1, 2, 3]})
    assert rbt.is_complete(good)
    assert rbt.read_checkpoint_dir(good)["step"] == 100
    # A crash mid-write: state present, marker missing.
    torn = tmp_path / "checkpoint_000002"
    torn.mkdir()
    rbt.write_checkpoint_dir(torn, {"step": 150})
    (torn / rbt.MARKER).unlink()
    assert not rbt.is_complete(torn)
    # Bit rot or a truncated copy: marker present, content changed.
    bad = tmp_path / "checkpoint_000003"
    bad.mkdir()
    rbt.write_checkpoint_dir(bad, {"step": 200})
    with open(bad / rbt.STATE, "r+b") as f:
        f.truncate(10)
    assert not rbt.is_complete(bad)
    # The newest complete one: not the oldest, not a torn or rotten newer one.
    newest_complete = next(p for p in rbt.checkpoints_newest_first(tmp_path) if rbt.is_complete(p))
    assert newest_complete == good


def test_preempted_flag_is_checked_at_most_every_interval_and_sticks(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(rbt.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(rbt, "_preempt", rbt._Preempt())
    monkeypatch.setenv("RAYBRIDGE_JOB_DIR", str(tmp_path))
    assert not rbt.preempted()
    (tmp_path / "preempt").touch()
    assert not rbt.preempted()  # within the interval: no look at storage
    clock[0] += rbt.PREEMPT_CHECK_S
    assert rbt.preempted()
    (tmp_path / "preempt").unlink()
    clock[0] += 10
    assert rbt.preempted()  # a warning is never forgotten by the process that saw it


def test_preempted_is_false_outside_a_job(monkeypatch):
    monkeypatch.setattr(rbt, "_preempt", rbt._Preempt())
    monkeypatch.delenv("RAYBRIDGE_JOB_DIR", raising=False)
    assert not rbt.preempted(0)


def _rank_loop(rank: int, world: int, port: int, base: str, out) -> None:
    import time

    import torch.distributed as dist

    rbt.PREEMPT_CHECK_S = 0.02
    job_dir = Path(base) / f"rank{rank}"
    job_dir.mkdir()
    os.environ["RAYBRIDGE_JOB_DIR"] = str(job_dir)  # only rank 0's folder ever gets the flag
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stopped_at = None
    for step in range(2000):
        if rank == 0 and step == 37:
            (job_dir / "preempt").touch()
        time.sleep(0.001 * (1 + rank))  # ranks run at different speeds, as real ones do
        if rbt.preempted(step):
            stopped_at = step
            break
    dist.barrier()
    out.put((rank, stopped_at))
    dist.destroy_process_group()


def test_preempted_turns_true_on_every_rank_at_the_same_step(tmp_path):
    """Ranks that saw the warning at different times still stop together; otherwise one would enter the
    checkpoint's collective while the other waits in the next step's all-reduce, and both would hang."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_loop, args=(r, 3, port, str(tmp_path), out)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert len(set(results.values())) == 1, results
    assert results[0] is not None and results[0] >= 37


def test_make_trainer_follows_the_allocation(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYBRIDGE_SHARED_DIR", str(tmp_path))
    monkeypatch.setenv("RAYBRIDGE_TRAIN_WORKERS", "3")
    monkeypatch.setenv("RAYBRIDGE_CPUS_PER_WORKER", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "mlp")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("RAYBRIDGE_GPUS_PER_NODE", raising=False)
    t = rbt.make_trainer(lambda config: None, {"lr": 0.1}, max_failures=2)
    sc, rc = t.scaling_config, t.run_config
    assert (sc.num_workers, sc.use_gpu, sc.placement_strategy) == (3, False, "SPREAD")
    assert sc.resources_per_worker == {"CPU": 4.0}
    assert (rc.name, rc.storage_path) == ("mlp-77", str(tmp_path / "runs"))
    assert rc.failure_config.max_failures == 2
    assert t.backend_config.backend == "gloo"


def test_load_refuses_a_run_folder_others_can_write(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r-1"
    good = run / "checkpoint_000001"
    good.mkdir(parents=True)
    rbt.write_checkpoint_dir(good, {"step": 10})
    monkeypatch.setenv("RAYBRIDGE_STORAGE", str(tmp_path / "runs"))
    monkeypatch.setenv("RAYBRIDGE_RUN_NAME", "r-1")
    import ray.train

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert rbt.load()["step"] == 10
    run.chmod(0o777)  # a colleague (or anyone) could plant a checkpoint_999999 here
    with pytest.raises(rbt.CheckpointError, match="can be written by other users .*mode 777"):
        rbt.load()


def test_checkpoints_load_tensors_and_plain_data_only(tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    ok = tmp_path / "checkpoint_000001"
    ok.mkdir()
    rbt.write_checkpoint_dir(ok, {"step": 3, "model": {"w": torch.ones(2)}, "history": {"starts": [0, 1]}})
    state = rbt.read_checkpoint_dir(ok)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    evil = tmp_path / "checkpoint_000002"
    evil.mkdir()
    rbt.write_checkpoint_dir(evil, {"step": 4, "x": Payload()})  # marker and hash are valid
    assert rbt.is_complete(evil)
    with pytest.raises(rbt.CheckpointError, match="objects other than tensors and plain containers"):
        rbt.read_checkpoint_dir(evil)
