"""Checkpoint integrity and naming helpers (pure file logic; torch on CPU)."""

import os

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
    newest_complete = next(p for p in rbt.checkpoints_newest_first(tmp_path) if rbt.is_complete(p))
    assert newest_complete == good


def test_preempted_flag_is_checked_at_most_every_interval_and_sticks(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(rbt.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(rbt, "_preempt", {"seen": False, "checked_at": -1e9})
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
    monkeypatch.setattr(rbt, "_preempt", {"seen": False, "checked_at": -1e9})
    monkeypatch.delenv("RAYBRIDGE_JOB_DIR", raising=False)
    assert not rbt.preempted()


def test_default_workers_excludes_spares(monkeypatch):
    monkeypatch.setenv("RAYBRIDGE_NODES", "5")
    monkeypatch.setenv("RAYBRIDGE_TRAIN_WORKERS", "4")
    assert rbt.default_workers() == 4
    monkeypatch.delenv("RAYBRIDGE_TRAIN_WORKERS")
    assert rbt.default_workers() == 5
    assert os.environ["RAYBRIDGE_NODES"] == "5"


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
