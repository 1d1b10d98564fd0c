"""The in-process launcher must hand Ray's node launcher exactly what `ray start` would."""

from pathlib import Path

import pytest

from raybridge.agent import launch, netinfo, ports
from raybridge.agent.node import Agent, AgentConfig


class Captured(Exception):
    pass


def agent_args(tmp_path: Path, head: dict | None) -> list[str]:
    cfg = AgentConfig(
        job_id="77",
        job_dir=tmp_path,
        rank=0 if head is None else 1,
        nodes=2,
        interface=["auto"],
        node_tmp=str(tmp_path),
        ready_timeout=30,
        auth=False,
        object_store_fraction=0.3,
        ray_args=[],
    )
    env = {"SLURM_CPUS_ON_NODE": "2", "SLURM_MEM_PER_NODE": "3072"}
    agent = Agent(cfg, env)
    iface = netinfo.Iface("ib0", "10.212.0.11" if head is None else "10.212.0.12", "255.255.255.0")
    cmd = agent.ray_command(iface, ports.plan_for_block(3), head)
    assert Path(cmd[0]).name == "ray" and cmd[1] == "start"
    return cmd[2:]


def params_from(start, node_module) -> dict:
    """Run a start path with Ray's Node replaced by one that records its parameters and stops."""
    seen = {}

    class Recorder:
        def __init__(self, params, head=False, **kwargs):
            seen.update(vars(params), _head=head)
            seen["resource_isolation_config"] = vars(seen["resource_isolation_config"])
            raise Captured

    original = node_module.Node
    node_module.Node = Recorder
    try:
        with pytest.raises(Captured):
            start()
    finally:
        node_module.Node = original
    return seen


@pytest.mark.parametrize("role", ["head", "worker"])
def test_direct_start_passes_what_ray_start_would(tmp_path, monkeypatch, role):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    node_module, services = launch._ray_internals()
    head = None if role == "head" else {"ip": "10.212.0.11", "ports": {"gcs": 10000}}
    args = agent_args(tmp_path, head)
    options = launch.parse_args(args)
    assert options is not None, args
    direct = params_from(lambda: launch._start_direct(options, node_module, services), node_module)
    via_cli = params_from(lambda: launch._start_cli(args), node_module)
    assert direct == via_cli
    assert direct["_head"] is (role == "head")
    assert direct["num_cpus"] == 2 and direct["node_ip_address"].startswith("10.212.0.")


def test_unknown_options_go_to_rays_own_parser():
    assert launch.parse_args(["--num-cpus=2", "--head"]) == {"num-cpus": "2", "head": "true"}
    assert launch.parse_args(["--num-cpus=2", '--resources={"x": 1}']) is None
    assert launch.parse_args(["--log-style=record"]) is None
    assert launch.parse_args(["stray"]) is None


def test_head_record_for_joining_nodes_carries_the_head_folders():
    info = launch._head_record({"temp_dir": "/tmp/rb-1", "session_dir": "/tmp/rb-1/session_x"})()
    assert info[0].temp_dir == "/tmp/rb-1" and info[0].session_dir == "/tmp/rb-1/session_x"
    assert info[0].state == 0  # ALIVE, what Ray's join looks for


def test_unexpected_ray_internals_mean_the_ray_start_command(monkeypatch):
    node_module, _ = launch._ray_internals()
    monkeypatch.delattr(node_module.Node, "start_api_server")
    with pytest.raises(launch.LaunchUnavailable, match="expected methods"):
        launch.start(["--head"], log=None)


def test_spawn_guard_lets_nothing_start_after_stop():
    import threading
    import time

    guard = launch.SpawnGuard()
    started = []
    in_spawn = threading.Event()

    def slow_spawn(name):
        in_spawn.set()
        time.sleep(0.3)
        started.append(name)
        return name

    spawn = guard.wrap(slow_spawn)
    assert guard.wrap(spawn.unguarded).unguarded is slow_spawn  # wrapping again does not nest
    t = threading.Thread(target=spawn, args=("raylet",))
    t.start()
    in_spawn.wait()
    guard.stop()  # returns only once the spawn under way is done: a sweep now finds its process
    assert started == ["raylet"]
    with pytest.raises(RuntimeError, match="stopping"):
        spawn("dashboard")
    assert started == ["raylet"]
    t.join()
