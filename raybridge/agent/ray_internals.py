"""Start Ray on this node from inside the agent process, in the order that gets nodes alive first.

`ray start` is Ray's CLI for this: it turns its options into Ray's node parameters and builds Ray's
node launcher (`ray._private.node.Node`). Here the same happens in the agent's process, where Ray is
imported while the agent waits for Slurm and the head, not in a fresh interpreter. The options
raybridge passes itself are mapped directly (importing the CLI module costs ~0.4 s of CPU per node);
with any other option (the profile's `ray_args`) Ray's own `start` command parses them, in-process.
What changes is the order of the processes Ray's launcher starts, and two of its waits.

Ray's order on the head: GCS, autoscaler monitor, Ray Client server, dashboard (and wait for it),
log monitor, raylet. The raylet registers the node only after its own dashboard agent is up, so the
node is alive only after two Python servers started one after the other, while three more compete
for the CPU. Here: GCS, then the raylet (with its agents). Once every node is alive the head starts
the dashboard and the Ray Client server (what clients use); once those answer, the log monitors and
the autoscaler monitor (what nothing waits for). Every process and every option is still Ray's;
only the start order changed.

The waits: Ray polls the GCS for "is my raylet registered?" once a second: here every
50 ms. A joining node asks the GCS for the head node's record (polling every 2 s until the head's
raylet registered) only to learn the head's temp and session folders; the head publishes those with
its address as soon as the GCS serves, so workers start their raylets while the head's is starting.

This is the only module of raybridge that touches Ray's private modules (`ray._private`,
`ray._raylet`, the generated GCS protobufs); the GCS node view lives here too. Ray treats them as
free to change, so the fast start runs only where it was verified: on a Ray minor version listed in
VERIFIED whose fingerprint (the source of the two Node methods replaced or wrapped here, and the
signatures of every Ray function called) matches the recorded one. Anything else, and any error
before the first Ray process exists, raises LaunchUnavailable with the reason, and the agent falls
back to the `ray start` command. Every process Ray's launcher starts here goes through a
SpawnGuard, so that none starts once the agent's teardown began.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import IO, Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
POLL_S = 0.05


class LaunchUnavailable(RuntimeError):
    """Ray's internals are not what this module expects: use the `ray start` command instead."""


def preload() -> None:
    """Import what start() and GcsView need (about a second of CPU); call early, from a thread.
    Errors are not lost: start() and GcsView meet them again and report them."""
    with contextlib.suppress(Exception):
        GcsView.preload()
        _ray_internals()
        import ray._private.authentication.authentication_token_setup  # noqa: F401
        import ray._private.parameter  # noqa: F401


# `ray start` option -> (RayParams field, type): the options the agent itself passes.
PARAMS: dict[str, tuple[str, type]] = {
    "node-ip-address": ("node_ip_address", str),
    "temp-dir": ("temp_dir", str),
    "num-cpus": ("num_cpus", int),
    "num-gpus": ("num_gpus", int),
    "object-store-memory": ("object_store_memory", int),
    "memory": ("memory", int),
    "node-manager-port": ("node_manager_port", int),
    "object-manager-port": ("object_manager_port", int),
    "metrics-export-port": ("metrics_export_port", int),
    "dashboard-agent-listen-port": ("dashboard_agent_listen_port", int),
    "dashboard-agent-grpc-port": ("metrics_agent_port", int),
    "runtime-env-agent-port": ("runtime_env_agent_port", int),
    "min-worker-port": ("min_worker_port", int),
    "max-worker-port": ("max_worker_port", int),
    "ray-client-server-port": ("ray_client_server_port", int),
    "autoscaling-config": ("autoscaling_config", str),
    "include-dashboard": ("include_dashboard", lambda v: v.lower() == "true"),
    "dashboard-host": ("dashboard_host", str),
    "dashboard-port": ("dashboard_port", int),
}
SPECIAL = {"head", "disable-usage-stats", "port", "address"}


def parse_args(args: Sequence[str]) -> dict[str, str] | None:
    """`--name=value` / `--flag` options -> {name: value}; None if any is not one the direct path
    knows (then Ray's own CLI parses them)."""
    out = {}
    for a in args:
        name, eq, value = a.removeprefix("--").partition("=")
        if not a.startswith("--") or (name not in PARAMS and name not in SPECIAL):
            return None
        out[name] = value if eq else "true"
    return out


# Ray minor versions the fast start was verified on, with the fingerprint of what it relies on
# (scripts/ray-fingerprints prints them for an installed Ray or for wheels; the compatibility tests
# run on the oldest supported and the newest release). A patch release with the same fingerprint is
# accepted; another is not. 2.52-2.54 lack what the fast start needs: `ray start` there.
VERIFIED: dict[str, tuple[str, ...]] = {
    # 2.55 is not verified: its `ray start` also passes available_memory_bytes to RayParams, which
    # the direct start does not (found by the compat tests with RAYBRIDGE_COMPAT_RAY=2.55.1).
    # 2.56-2.60 share one fingerprint; the launcher's unit tests (parameters identical to `ray start`'s)
    # passed on 2.56.1, 2.57.1, 2.58.1, 2.59.0 and 2.60.0, a 2-node cluster on 2.56.1, 2.58.1, 2.60.0.
    **{minor: ("b68ce55c92220651",) for minor in ("2.56", "2.57", "2.58", "2.59", "2.60")},
}
# (module, qualified name, what is fingerprinted): the whole source where raybridge replaces or wraps
# the function, its signature where raybridge only calls it.
RELIED_ON: tuple[tuple[str, str, str], ...] = (
    ("ray._private.node", "Node.start_head_processes", "source"),
    ("ray._private.node", "Node.start_ray_processes", "source"),
    ("ray._private.node", "Node.__init__", "signature"),
    ("ray._private.node", "Node.start_gcs_server", "signature"),
    ("ray._private.node", "Node._write_cluster_info_to_kv", "signature"),
    ("ray._private.node", "Node.start_api_server", "signature"),
    ("ray._private.node", "Node.start_monitor", "signature"),
    ("ray._private.node", "Node.start_ray_client_server", "signature"),
    ("ray._private.node", "Node.start_log_monitor", "signature"),
    ("ray._private.node", "Node.start_raylet", "signature"),
    ("ray._private.services", "start_ray_process", "signature"),
    ("ray._private.services", "get_node", "signature"),
    ("ray._private.services", "get_node_ip_address", "signature"),
    ("ray._private.services", "canonicalize_bootstrap_address", "signature"),
    ("ray._private.utils", "get_all_node_info_until_retrieved", "signature"),
    ("ray._private.utils", "write_ray_address", "signature"),
    ("ray._private.parameter", "RayParams.__init__", "signature"),
    ("ray._private.parameter", "RayParams.update_if_absent", "signature"),
)


@dataclass(frozen=True)
class Support:
    """Whether the installed Ray may take the fast start, and why not."""

    version: str
    fast: bool
    reason: str = ""


def definition(source: str, qualname: str) -> ast.FunctionDef | None:
    """The def of `Class.method` or `function` in a module's source, or None."""
    scope: list[ast.stmt] = ast.parse(source).body
    *outer, name = qualname.split(".")
    for part in outer:
        cls = next((n for n in scope if isinstance(n, ast.ClassDef) and n.name == part), None)
        if cls is None:
            return None
        scope = cls.body
    found = [n for n in scope if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name]
    return found[-1] if found else None  # the last definition wins, as at import time


def fingerprint(sources: dict[str, str]) -> str:
    """Hash of what raybridge relies on, from the modules' source text (module name -> source)."""
    h = hashlib.sha256()
    for module, qualname, what in RELIED_ON:
        text = sources.get(module)
        node = definition(text, qualname) if text else None
        if node is None:
            part = "missing"
        elif what == "signature":
            part = signature(node.args)
        else:
            lines = text.splitlines()[node.lineno - 1 : node.end_lineno]
            part = textwrap.dedent("\n".join(lines)).strip()
        h.update(f"{module}:{qualname}:{what}\n{part}\n".encode())
    return h.hexdigest()[:16]


def signature(args: ast.arguments) -> str:
    """Parameter names, kinds and defaults: what a call depends on (type annotations are not)."""
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    parts = [
        a.arg + (f"={ast.unparse(d)}" if d is not None else "")
        for a, d in zip(positional, defaults, strict=True)
    ]
    if args.vararg:
        parts.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        parts.append("*")
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        parts.append(a.arg + (f"={ast.unparse(d)}" if d is not None else ""))
    if args.kwarg:
        parts.append("**" + args.kwarg.arg)
    return ", ".join(parts)


def installed_sources() -> dict[str, str]:
    import importlib
    import inspect

    out = {}
    for module in sorted({m for m, _, _ in RELIED_ON}):
        with contextlib.suppress(Exception):
            out[module] = inspect.getsource(importlib.import_module(module))
    return out


@cache
def support() -> Support:
    """Checked once per process: the installed Ray's version and fingerprint against VERIFIED."""
    try:
        import ray

        version = ray.__version__
    except Exception as e:
        return Support("?", False, f"Ray is not importable ({e})")
    minor = ".".join(version.split(".")[:2])
    if minor not in VERIFIED:
        known = ", ".join(VERIFIED)
        return Support(version, False, f"Ray {version} is not one the fast start was verified on ({known})")
    found = fingerprint(installed_sources())
    if found not in VERIFIED[minor]:
        return Support(
            version, False, f"Ray {version}'s internals differ from those verified for {minor} ({found})"
        )
    return Support(version, True)


def _ray_internals() -> tuple[Any, Any]:
    verdict = support()
    if not verdict.fast:
        raise LaunchUnavailable(verdict.reason)
    try:
        import ray._private.node as node_module
        import ray._private.services as services
    except ImportError as e:
        raise LaunchUnavailable(f"Ray's node launcher is not importable: {e}") from e
    return node_module, services


def _start_direct(options: dict[str, str], node_module: Any, services: Any) -> None:
    """What `ray start` does with these options (scripts.py `start`), minus the console output."""
    import ray._private.utils as ray_utils
    from ray._private.authentication import authentication_token_setup as token_setup
    from ray._private.parameter import RayParams

    kwargs = {field: conv(options[name]) for name, (field, conv) in PARAMS.items() if name in options}
    if kwargs.get("ray_client_server_port") is None and ray_utils.get_ray_client_dependency_error() is None:
        kwargs["ray_client_server_port"] = 10001  # the CLI's default, also on nodes that do not serve it
    params = RayParams(
        node_name=options.get("node-ip-address"), huge_pages=False, resources={}, labels={}, **kwargs
    )
    head = "head" in options
    if head:
        params.gcs_server_port = int(options["port"])
        params.update_if_absent(redis_shard_ports=None, num_redis_shards=None, redis_max_clients=None)
    else:
        params.gcs_address = services.canonicalize_bootstrap_address(
            options["address"], temp_dir=params.temp_dir
        )
    if head and hasattr(token_setup, "maybe_enable_token_auth_if_token_available"):
        token_setup.maybe_enable_token_auth_if_token_available()  # what `ray start --head` does (2.59+)
    token_setup.ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    node = node_module.Node(params, head=head, shutdown_at_exit=False, spawn_reaper=False)
    ray_utils.write_ray_address(node.gcs_address, params.temp_dir)


def _start_cli(args: Sequence[str]) -> None:
    from ray.scripts.scripts import start as start_command

    try:
        start_command.main(args=list(args), prog_name="ray start", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"`ray start` exited with {e.code}") from None


@contextlib.contextmanager
def _patched(module: Any, **attrs: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def transient(e: BaseException) -> bool:
    """An error from the GCS that a later try can get past (not up yet, busy, slow)."""
    import ray.exceptions as rex

    return isinstance(e, rex.RpcError | rex.GetTimeoutError | TimeoutError | ConnectionError)


def _quick_get_node(original: Callable[..., Any]) -> Callable[..., Any]:
    """services.get_node, but first wait (50-ms polls) until the node is in the GCS: Ray's own
    wait sleeps a second between tries. Only errors a later try can get past are retried; any
    other goes to Ray's own get_node, which raises it."""

    def get_node(gcs_address: str, node_id: str, *args: Any, **kwargs: Any) -> Any:
        from ray._raylet import GcsClient

        client = GcsClient(address=gcs_address)
        deadline = time.monotonic() + 30
        said = False
        while time.monotonic() < deadline:
            try:
                if any(k.hex() == node_id for k in client.get_all_node_info(timeout=2)):
                    break
            except Exception as e:
                if not transient(e):
                    break
                if not said:
                    log.info("waiting for the GCS to list this node (retrying: %s)", first_line(e))
                    said = True
            time.sleep(POLL_S)
        return original(gcs_address, node_id, *args, **kwargs)

    return get_node


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class SpawnGuard:
    """Lets Ray's launcher start processes until stop(), none after it: teardown sweeps this job's
    processes once, and a start still under way in a thread must not add one behind it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopped = False
        self.spawned = 0  # processes started through this guard

    def stop(self) -> None:
        """Returns once a process being started is there (findable); none starts after this."""
        with self.lock:
            self.stopped = True

    def wrap(self, start_process: Callable[..., Any]) -> Callable[..., Any]:
        """Ray's services.start_ray_process, through which its launcher starts every process."""

        def start_ray_process(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                if self.stopped:
                    raise RuntimeError("the agent is stopping")
                self.spawned += 1
                return start_process(*args, **kwargs)

        start_ray_process.unguarded = start_process  # type: ignore[attr-defined]
        return start_ray_process


class Started:
    """A node started by start(): the Ray Node object and what still runs in the background."""

    def __init__(self, node: Any, guard: SpawnGuard):
        self.node = node
        self.guard = guard
        self.background_started = False
        self.services_started = False
        self.errors: list[str] = []

    def run_later(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        def target() -> None:
            try:
                fn(*args, **kwargs)
            except Exception as e:  # reported by the agent, never a silent thread death
                if not self.guard.stopped:
                    self.errors.append(f"{name}: {e}")

        threading.Thread(target=target, name=name, daemon=True).start()

    def start_services(self) -> None:
        """The head's services that clients use: the dashboard (with the Jobs API) and the Ray
        Client server. Started once every node is alive, so that they do not compete with the
        nodes' own start for the CPU."""
        node, params = self.node, self.node._ray_params
        self.services_started = True
        if not node.head:
            return
        dash = params.include_dashboard
        self.run_later(
            "dashboard", node.start_api_server, include_dashboard=dash, raise_on_failure=bool(dash)
        )
        if params.ray_client_server_port:
            self.run_later("ray-client-server", node.start_ray_client_server)

    def start_background(self) -> None:
        """What nothing waits for, started once the cluster is ready: the log monitor (it streams
        workers' output to drivers, from the start of each log file) and the head's autoscaler
        monitor (`ray status`)."""
        node, params = self.node, self.node._ray_params
        self.background_started = True
        if params.include_log_monitor:
            self.run_later("log monitor", node.start_log_monitor)
        if node.head and not params.no_monitor:
            self.run_later("monitor", node.start_monitor)

    def services_pending(self) -> str:
        """What start_services() started that does not answer yet ('' = all up); raises if one
        failed to start."""
        if self.errors:
            raise RuntimeError("; ".join(self.errors))
        if not getattr(self.node, "_webui_url", None):
            return "the dashboard"
        params = self.node._ray_params
        if params.ray_client_server_port and not _port_open(
            params.node_ip_address, params.ray_client_server_port
        ):
            return "the Ray Client server"
        return ""


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _head_record(dirs: dict[str, str]) -> Callable[..., Any]:
    """In place of utils.get_all_node_info_until_retrieved on a joining node: the head's record as
    far as Ray's join uses it (its folders), from what the head published."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    def head_info(*_args: Any, **_kwargs: Any) -> list[Any]:
        return [GcsNodeInfo(state=GcsNodeInfo.GcsNodeState.ALIVE, **dirs)]

    return head_info


def start(
    args: Sequence[str],
    log: IO[str],
    on_gcs_up: Callable[[dict[str, str]], None] | None = None,
    head_dirs: dict[str, str] | None = None,
    guard: SpawnGuard | None = None,
) -> Started:
    """Run `ray start ARGS` in this process with the reordered launcher; return once the raylet
    registered with the GCS. On the head, on_gcs_up(dirs) runs as soon as the GCS serves: nodes can
    join from then on, given `dirs` (the head's temp_dir and session_dir) as head_dirs. Output goes
    to `log`. Raises RuntimeError with Ray's message."""
    node_module, services = _ray_internals()
    options = parse_args(args)
    guard = guard or SpawnGuard()
    spawned_before = guard.spawned
    # For good, not for this call: the dashboard and monitors start later, in threads.
    spawn = services.start_ray_process
    services.start_ray_process = guard.wrap(getattr(spawn, "unguarded", spawn))
    original = node_module.Node
    box: dict[str, Started] = {}

    class FastNode(original):  # type: ignore[misc, valid-type]
        def start_head_processes(self) -> None:
            self.start_gcs_server()
            self._write_cluster_info_to_kv()
            if on_gcs_up:
                on_gcs_up({"temp_dir": self.temp_dir, "session_dir": self._session_dir})

        def start_ray_processes(self) -> None:
            box["started"] = Started(self, guard)
            include_log_monitor = self._ray_params.include_log_monitor
            self._ray_params.include_log_monitor = False
            try:
                super().start_ray_processes()  # the raylet (and its agents)
            finally:
                self._ray_params.include_log_monitor = include_log_monitor

    node_patches = {"Node": FastNode}
    if head_dirs:
        try:
            node_patches["get_all_node_info_until_retrieved"] = _head_record(head_dirs)
        except Exception as e:
            raise LaunchUnavailable(f"Ray's GCS records are not as expected: {first_line(e)}") from e
    service_patches = {"get_node": _quick_get_node(services.get_node)}
    ip = next((a.split("=", 1)[1] for a in args if a.startswith("--node-ip-address=")), None)
    if ip:
        # Ray asks this only to name the node in a version check; unanswered, it probes 8.8.8.8
        # and warns on stderr (no route there is normal on a cluster).
        service_patches["get_node_ip_address"] = lambda address=None: ip
    patches = (_patched(node_module, **node_patches), _patched(services, **service_patches))
    # Module attributes: patched for this call only, one call at a time.
    with _lock, patches[0], patches[1], contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            if options is not None:
                _start_direct(options, node_module, services)
            else:
                _start_cli(args)
        except Exception as e:
            if guard.spawned == spawned_before and not guard.stopped:
                # Nothing of Ray runs yet: `ray start` can still do it, and say what went wrong.
                raise LaunchUnavailable(
                    f"Ray's launcher failed before starting a process ({type(e).__name__}: {first_line(e)})"
                ) from e
            if isinstance(e, RuntimeError):
                raise
            raise RuntimeError(f"`ray start` failed: {e}") from e
    if "started" not in box:
        raise RuntimeError("`ray start` returned without starting a raylet")
    return box["started"]


class GcsUnavailable(RuntimeError):
    """The GCS did not answer this time (not up yet, busy); a later try may succeed."""


def died_at(node: Any) -> float | None:
    """When the GCS marked a dead node dead (GcsNodeInfo.end_time_ms, the GCS's clock: the head's), so
    the timeline shows Ray's moment rather than when the head's next look saw it; None if unknown."""
    ms = getattr(node, "end_time_ms", 0)
    if getattr(node, "state", 0) == 0 or not isinstance(ms, int) or ms <= 0:
        return None
    return ms / 1000


class GcsView:
    """Node table from the head's GCS (uses the auth token from the environment)."""

    def __init__(self, address: str):
        from ray._raylet import GcsClient  # the client `ray status` uses

        self.address = address
        self.client = GcsClient(address=address)

    @staticmethod
    def preload() -> None:
        import ray._raylet  # noqa: F401

    def nodes(self) -> list[dict[str, Any]]:
        """One record per node address (the alive one where a restarted node shows up twice).
        GcsUnavailable when the GCS did not answer; anything else (a refused token) is raised."""
        try:
            info = self.client.get_all_node_info(timeout=5)
        except Exception as e:
            if transient(e):
                raise GcsUnavailable(first_line(e)) from e
            raise
        best: dict[str, dict[str, Any]] = {}
        for node_id, n in info.items():
            total = dict(getattr(n, "resources_total", {}) or {})
            rec = {
                "node_id": node_id.hex() if hasattr(node_id, "hex") else str(node_id),
                "ip": n.node_manager_address,
                "ray_hostname": n.node_manager_hostname,
                "alive": n.state == 0,
                "ray_cpus": total.get("CPU", 0),
                "ray_gpus": total.get("GPU", 0),
                "died_at": died_at(n),
            }
            if rec["ip"] not in best or rec["alive"]:
                best[rec["ip"]] = rec
        return list(best.values())

    def alive_count(self) -> int:
        return sum(1 for n in self.nodes() if n["alive"])

    def alive_actors(self) -> list[ActorView]:
        """The alive actors' job, class and runtime env, from the GCS's actor table (what Ray's state
        API lists). GcsUnavailable when the GCS did not answer."""
        import asyncio

        from ray.core.generated import gcs_pb2

        alive = gcs_pb2.ActorTableData.ActorState.Value("ALIVE")

        async def fetch() -> Any:  # only the alive ones travel (the table keeps dead actors too)
            return await self.client.async_get_all_actor_info(actor_state_name="ALIVE", timeout=5)

        try:
            info = asyncio.run(fetch())
        except Exception as e:
            if transient(e):
                raise GcsUnavailable(first_line(e)) from e
            raise
        return [
            ActorView(a.job_id.hex(), a.class_name, a.node_id.hex(), a.serialized_runtime_env)
            for a in info.values()
            if a.state == alive
        ]


@dataclass(frozen=True)
class ActorView:
    job_id: str  # hex, as Ray prints it
    class_name: str
    node_id: str
    runtime_env: str  # serialized, exactly as Ray's scheduler hashed it to pick a worker process


def prestart_workers(
    raylet: str, job_id: str, runtime_env: str, count: int, keep_alive_s: int, token_path: str | None
) -> str | None:
    """Ask the raylet at `raylet` (ip:node manager port) to start `count` idle Python worker
    processes with this runtime env, kept alive `keep_alive_s` (the raylet's PrestartWorkers call,
    what Ray's core worker uses for the same); for this job, or with job_id "" for the first job
    that takes one. An actor with the same runtime env placed on the node later takes one of them
    instead of a fresh process.
    None when the raylet took the request, else why not (one line)."""
    try:
        import grpc
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.Language.Value("PYTHON"),
            keep_alive_duration_secs=keep_alive_s,
            num_workers=count,
        )
        if job_id:
            request.job_id = bytes.fromhex(job_id)
        request.runtime_env_info.serialized_runtime_env = runtime_env
        metadata = []
        if token_path:
            with open(token_path) as f:
                metadata.append(("authorization", "Bearer " + f.read().strip()))
        with grpc.insecure_channel(raylet) as channel:
            stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
            stub.PrestartWorkers(request, timeout=5, metadata=metadata)
    except Exception as e:
        if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):  # gRPC's error
            details = (e.details() or "").strip().splitlines() or [""]
            return f"{e.code().name}: {details[0][:200]}"
        return first_line(e)
    return None


DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"  # Ray Train's preemption path and Serve's replica moves


def drain_node(gcs_address: str, node_id: str, message: str, deadline_s: float | None) -> str | None:
    """Ray's drain notice for one node: the scheduler places nothing new there, Ray Train's preemption
    watcher tells the training, Serve moves replicas away; the node is expected gone in deadline_s.
    deadline_s None: no deadline. Returns None when Ray accepted it, else why not (one line).

    Ray's GCS client (what Ray's `ray drain-node` and its autoscaler call) where it has drain_node
    with the arguments checked here; otherwise Ray's own `ray drain-node` command, which every Ray
    this project supports has (hidden from `ray --help`)."""
    deadline_ms = 0 if deadline_s is None else int((time.time() + max(deadline_s, 0)) * 1000)
    try:
        from ray._raylet import GcsClient
        from ray.core.generated import autoscaler_pb2

        client = GcsClient(address=gcs_address)
        call = getattr(client, "drain_node", None)
        reason = autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON)
        if call is not None:
            accepted, why = call(node_id, reason, message, deadline_ms)
            return None if accepted else f"Ray refused the drain: {why}"
    except Exception as e:  # not what this module expects: Ray's command below
        log.debug("GCS client drain unavailable (%s); using `ray drain-node`", first_line(e))
    return _drain_cli(gcs_address, node_id, message, deadline_s)


def ray_executable(path: str | None = None) -> str | None:
    """Ray's `ray` command next to this Python (its venv's bin), else on path (default: $PATH)."""
    search = os.environ.get("PATH", "") if path is None else path
    return shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + search)


def _drain_cli(gcs_address: str, node_id: str, message: str, deadline_s: float | None) -> str | None:
    ray = ray_executable()
    if ray is None:
        return "this Ray has no `ray` command"
    cmd = [
        ray,
        "drain-node",
        f"--address={gcs_address}",
        f"--node-id={node_id}",
        f"--reason={DRAIN_REASON}",
        f"--reason-message={message}",
    ]
    cmd += [] if deadline_s is None else [f"--deadline-remaining-seconds={max(int(deadline_s), 0)}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ray drain-node` failed: {first_line(e)}"
    if r.returncode != 0:
        return "Ray refused the drain: " + ((r.stderr or r.stdout).strip().splitlines() or ["?"])[-1][-200:]
    return None
