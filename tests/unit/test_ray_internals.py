"""Ray's internals behind one door: the in-process launcher hands Ray's node launcher exactly what
`ray start` would, runs only where it was verified, and falls back on anything unexpected."""

import time
from pathlib import Path

import pytest

from raybridge import jobdir as jd
from raybridge.agent import netinfo, ports
from raybridge.agent import ray_internals as launch
from raybridge.agent.startray import RayStarter
from raybridge.settings import AgentSettings

FAST = launch.support().fast  # the installed Ray is one the fast start was verified on
needs_fast = pytest.mark.skipif(not FAST, reason=f"fast start not verified here: {launch.support().reason}")


class Captured(Exception):
    pass


def starter(tmp_path: Path, rank: int = 0, env: dict | None = None) -> RayStarter:
    settings = AgentSettings(
        shared_dir=str(tmp_path),
        nodes=2,
        node_tmp=str(tmp_path),
        ready_timeout=30,
        auth=False,
        job_id="77",
        rank=rank,
    )
    env = env if env is not None else {"SLURM_CPUS_ON_NODE": "2", "SLURM_MEM_PER_NODE": "3072"}
    return RayStarter(settings, env, say=lambda m: None, stop_requested=lambda: (tmp_path / "stop").exists())


def agent_args(tmp_path: Path, head: jd.HeadRecord | None) -> list[str]:
    iface = netinfo.Iface("ib0", "10.212.0.11" if head is None else "10.212.0.12", "255.255.255.0")
    cmd = starter(tmp_path, 0 if head is None else 1).ray_command(iface, ports.plan_for_block(3), head)
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


@needs_fast
@pytest.mark.parametrize("role", ["head", "worker"])
def test_direct_start_passes_what_ray_start_would(tmp_path, monkeypatch, role):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    node_module, services = launch._ray_internals()
    head = None if role == "head" else jd.HeadRecord("10.212.0.11", "n1", "ib0", {"gcs": 10000}, 1.0)
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


@needs_fast
def test_head_record_for_joining_nodes_carries_the_head_folders():
    info = launch._head_record({"temp_dir": "/tmp/rb-1", "session_dir": "/tmp/rb-1/session_x"})()
    assert info[0].temp_dir == "/tmp/rb-1" and info[0].session_dir == "/tmp/rb-1/session_x"
    assert info[0].state == 0  # ALIVE, what Ray's join looks for


def test_the_installed_ray_is_checked_against_the_verified_list():
    import ray

    verdict = launch.support()
    minor = ".".join(ray.__version__.split(".")[:2])
    assert verdict.version == ray.__version__
    assert verdict.fast == (
        minor in launch.VERIFIED and launch.fingerprint(launch.installed_sources()) in launch.VERIFIED[minor]
    )
    if not verdict.fast:
        assert ray.__version__ in verdict.reason


def test_a_changed_ray_internal_means_the_ray_start_command(monkeypatch):
    sources = launch.installed_sources()
    before = launch.fingerprint(sources)
    # A Ray that adds a step to the head's start: it would be skipped without a word otherwise.
    node = sources["ray._private.node"].replace(
        "        self.start_gcs_server()\n",
        "        self.start_gcs_server()\n        self.start_new_thing()\n",
        1,
    )
    assert node != sources["ray._private.node"]
    assert launch.fingerprint(sources | {"ray._private.node": node}) != before
    # A renamed keyword of something only called: the signature is part of the fingerprint.
    params = sources["ray._private.parameter"].replace(
        "dashboard_host: Optional", "dashboard_bind_host: Optional", 1
    )
    assert params != sources["ray._private.parameter"]
    assert launch.fingerprint(sources | {"ray._private.parameter": params}) != before
    # A missing function.
    services = sources["ray._private.services"].replace("def get_node_ip_address(", "def node_ip_v2(", 1)
    assert services != sources["ray._private.services"]
    assert launch.fingerprint(sources | {"ray._private.services": services}) != before
    import ray

    minor = ".".join(ray.__version__.split(".")[:2])
    monkeypatch.setitem(launch.VERIFIED, minor, (before,))  # this Ray, as if verified as it is
    monkeypatch.setattr(launch, "installed_sources", lambda: sources | {"ray._private.node": node})
    launch.support.cache_clear()
    try:
        verdict = launch.support()
        assert not verdict.fast and "differ from those verified" in verdict.reason
        with pytest.raises(launch.LaunchUnavailable, match="differ from those verified"):
            launch.start(["--head"], log=None)
    finally:
        launch.support.cache_clear()


def test_an_unverified_ray_version_means_the_ray_start_command(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "9.99.0")
    launch.support.cache_clear()
    try:
        verdict = launch.support()
        assert not verdict.fast and "Ray 9.99.0 is not one the fast start was verified on" in verdict.reason
    finally:
        launch.support.cache_clear()


@needs_fast
def test_an_error_before_any_ray_process_falls_back(tmp_path, monkeypatch):
    import io

    import ray._private.parameter as parameter

    def renamed(*args, **kwargs):  # a RayParams that lost a keyword
        raise TypeError("__init__() got an unexpected keyword argument 'dashboard_host'")

    monkeypatch.setattr(parameter, "RayParams", renamed)
    guard = launch.SpawnGuard()
    with pytest.raises(launch.LaunchUnavailable, match="before starting a process .*unexpected keyword"):
        launch.start(agent_args(tmp_path, None), io.StringIO(), guard=guard)
    assert guard.spawned == 0


def test_only_errors_a_later_try_can_get_past_are_retried():
    import ray.exceptions as rex

    assert launch.transient(rex.RpcError("unavailable"))
    assert launch.transient(TimeoutError())
    assert not launch.transient(rex.AuthenticationError("bad token"))
    assert not launch.transient(TypeError("bug"))


def test_gcs_view_says_when_the_gcs_did_not_answer_and_raises_the_rest():
    import ray.exceptions as rex

    class Client:
        def __init__(self, error):
            self.error = error

        def get_all_node_info(self, timeout):
            raise self.error

    view = launch.GcsView.__new__(launch.GcsView)
    view.client = Client(rex.RpcError("Timed out while waiting for GCS to become available."))
    with pytest.raises(launch.GcsUnavailable, match="Timed out"):
        view.alive_count()
    view.client = Client(rex.AuthenticationError("InvalidAuthToken"))
    with pytest.raises(rex.AuthenticationError):
        view.nodes()


def test_a_stop_request_interrupts_a_start_that_hangs(tmp_path):
    import threading
    import time

    from raybridge.agent.startray import StopRequested

    s = starter(tmp_path, env={})
    assert s.until_stopped(lambda: 42) == 42
    with pytest.raises(ValueError, match="from the start"):
        s.until_stopped(lambda: (_ for _ in ()).throw(ValueError("from the start")))
    # A start waiting for a head that is gone: `raybridge down` (the stop file) must not wait for it.
    released = threading.Event()
    threading.Timer(0.3, lambda: (tmp_path / "stop").touch()).start()
    t0 = time.monotonic()
    with pytest.raises(StopRequested):
        s.until_stopped(lambda: released.wait(30))
    assert time.monotonic() - t0 < 5


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


class _Client:
    """Ray's GCS client as drain_node sees it: with (answer given) or without drain_node."""

    calls: list = []
    answer: tuple | None = (True, "")

    def __init__(self, address):
        self.address = address

    def __getattr__(self, name):
        if name == "drain_node" and _Client.answer is not None:
            return lambda *a: (_Client.calls.append(a), _Client.answer)[1]
        raise AttributeError(name)


def test_drain_goes_through_rays_gcs_client_with_reason_and_deadline(monkeypatch):
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    monkeypatch.setattr(ray._raylet, "GcsClient", _Client)
    _Client.calls, _Client.answer = [], (True, "")
    assert launch.drain_node("10.0.0.1:6379", "ab" * 28, "why", 60) is None
    ((node, reason, message, deadline_ms),) = _Client.calls
    assert node == "ab" * 28 and message == "why"
    assert reason == autoscaler_pb2.DRAIN_NODE_REASON_PREEMPTION
    assert abs(deadline_ms / 1000 - time.time() - 60) < 5
    _Client.calls, _Client.answer = [], (False, "node is busy")
    assert launch.drain_node("10.0.0.1:6379", "ab" * 28, "why", None) == "Ray refused the drain: node is busy"
    assert _Client.calls[0][3] == 0  # no deadline


def test_drain_falls_back_on_rays_command_where_the_client_has_no_drain(monkeypatch, tmp_path):
    import ray._raylet

    monkeypatch.setattr(ray._raylet, "GcsClient", _Client)
    _Client.answer = None
    record = tmp_path / "argv"
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    monkeypatch.setattr(launch, "ray_executable", lambda: str(fake))
    assert launch.drain_node("10.0.0.1:6379", "cd" * 28, "released", 3) is None
    assert record.read_text().split("\n")[:6] == [
        "drain-node",
        "--address=10.0.0.1:6379",
        f"--node-id={'cd' * 28}",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message=released",
        "--deadline-remaining-seconds=3",
    ]
    fake.write_text("#!/bin/sh\necho 'Error: The drain request is not accepted: busy' >&2\nexit 1\n")
    assert launch.drain_node("10.0.0.1:6379", "cd" * 28, "released", 3) == (
        "Ray refused the drain: Error: The drain request is not accepted: busy"
    )


def test_prestart_says_in_one_line_why_a_raylet_did_not_take_the_request(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: a raylet that is gone or restarting
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = tmp_path / "token"
    token.write_text("secret\n")
    why = launch.prestart_workers(f"127.0.0.1:{port}", "", "{}", 1, 60, str(token))
    assert why is not None and why.startswith("UNAVAILABLE: ") and "\n" not in why  # the keeper retries
    assert "secret" not in why
