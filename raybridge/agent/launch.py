"""Start Ray on this node from inside the agent process, in the order that gets nodes alive first.

`ray start` is Ray's CLI for this; here its own command runs in-process (Ray is imported while the
agent waits for Slurm and the head, not in a fresh interpreter), with one change to Ray's node
launcher: the order of the processes it starts.

Ray's order on the head: GCS, autoscaler monitor, Ray Client server, dashboard (and wait for it),
log monitor, raylet. The raylet registers the node only after its own dashboard agent is up, so the
node is alive only after two Python servers started one after the other, while three more compete
for the CPU. Here: GCS, raylet (its agents start at once), then the dashboard in the background and
the log monitor; the monitor and the Ray Client server start once the node is alive. Every process
and every option is still Ray's; only the start order changed.

Two waits change too: Ray polls the GCS for "is my raylet registered?" once a second and, on a
joining node, for "is the head registered?" every 2 s. Both become 50-ms polls of the same query.

Anything unexpected in Ray's internals (another Ray version) raises LaunchUnavailable before a
process starts, and the agent falls back to the `ray start` command.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

_lock = threading.Lock()
POLL_S = 0.05


class LaunchUnavailable(RuntimeError):
    """Ray's internals are not what this module expects: use the `ray start` command instead."""


def preload() -> None:
    """Import what start() needs (about a second of CPU); call early, from a thread."""
    with contextlib.suppress(Exception):
        _ray_internals()


def _ray_internals() -> tuple[Any, Any, Any]:
    try:
        import ray._private.node as node_module
        import ray._private.services as services
        from ray.scripts.scripts import start as start_command
    except ImportError as e:
        raise LaunchUnavailable(f"Ray's node launcher is not importable: {e}") from e
    for module, name in ((services, "get_node"), (node_module, "get_all_node_info_until_retrieved")):
        if not callable(getattr(module, name, None)):
            raise LaunchUnavailable(f"Ray's {module.__name__}.{name} is missing")
    node_class = getattr(node_module, "Node", None)
    needed = (
        "start_head_processes",
        "start_ray_processes",
        "start_gcs_server",
        "_write_cluster_info_to_kv",
        "start_api_server",
        "start_monitor",
        "start_ray_client_server",
        "start_log_monitor",
        "start_raylet",
    )
    if node_class is None or any(not hasattr(node_class, n) for n in needed):
        raise LaunchUnavailable("Ray's Node class does not have the expected methods")
    return node_module, services, start_command


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


def _quick_get_node(original: Callable[..., Any]) -> Callable[..., Any]:
    """services.get_node, but first wait (50-ms polls) until the node is in the GCS: Ray's own
    wait sleeps a second between tries."""

    def get_node(gcs_address: str, node_id: str, *args: Any, **kwargs: Any) -> Any:
        from ray._raylet import GcsClient

        client = GcsClient(address=gcs_address)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if any(k.hex() == node_id for k in client.get_all_node_info(timeout=2)):
                    break
            time.sleep(POLL_S)
        return original(gcs_address, node_id, *args, **kwargs)

    return get_node


def _quick_node_info(
    gcs_client: Any,
    node_selectors: Any = None,
    state_filter: Any = None,
    num_retries: int = 20,
    timeout_per_retry: Any = None,
) -> Any:
    """utils.get_all_node_info_until_retrieved with 50-ms polls (Ray's sleeps 2 s), same budget."""
    deadline = time.monotonic() + 2 * num_retries
    while True:
        with contextlib.suppress(Exception):
            infos = gcs_client.get_all_node_info(
                timeout=timeout_per_retry, node_selectors=node_selectors, state_filter=state_filter
            ).values()
            if infos:
                return infos
        if time.monotonic() > deadline:
            raise RuntimeError("no node info found for the head node in the GCS")
        time.sleep(POLL_S)


class Started:
    """A node started by start(): the Ray Node object and what still runs in the background."""

    def __init__(self, node: Any):
        self.node = node
        self.background: list[threading.Thread] = []
        self.errors: list[str] = []

    def run_later(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        def target() -> None:
            try:
                fn(*args, **kwargs)
            except Exception as e:  # reported by the agent, never a silent thread death
                self.errors.append(f"{name}: {e}")

        t = threading.Thread(target=target, name=name, daemon=True)
        self.background.append(t)
        t.start()

    def start_deferred(self) -> None:
        """The head's services nothing waits for: the autoscaler monitor and the Ray Client server."""
        params = self.node._ray_params
        if not params.no_monitor:
            self.run_later("monitor", self.node.start_monitor)
        if params.ray_client_server_port:
            self.run_later("ray-client-server", self.node.start_ray_client_server)

    def dashboard_url(self) -> str | None:
        return getattr(self.node, "_webui_url", None) or None


def start(args: Sequence[str], log: IO[str], on_gcs_up: Callable[[], None] | None = None) -> Started:
    """Run `ray start ARGS` in this process with the reordered launcher; return once the raylet
    registered with the GCS. on_gcs_up runs on the head as soon as the GCS serves (nodes can join
    from then on). Output goes to `log`. Raises RuntimeError with Ray's message."""
    node_module, services, start_command = _ray_internals()
    original = node_module.Node
    box: dict[str, Started] = {}

    class FastNode(original):  # type: ignore[misc, valid-type]
        def start_head_processes(self) -> None:
            self.start_gcs_server()
            self._write_cluster_info_to_kv()
            if on_gcs_up:
                on_gcs_up()

        def start_ray_processes(self) -> None:
            include_log_monitor = self._ray_params.include_log_monitor
            self._ray_params.include_log_monitor = False
            try:
                super().start_ray_processes()  # the raylet (and its agents)
            finally:
                self._ray_params.include_log_monitor = include_log_monitor
            started = box["started"] = Started(self)
            if self.head:
                dash = self._ray_params.include_dashboard
                started.run_later(
                    "dashboard", self.start_api_server, include_dashboard=dash, raise_on_failure=bool(dash)
                )
            if include_log_monitor:
                self.start_log_monitor()

    patches = (
        _patched(node_module, Node=FastNode, get_all_node_info_until_retrieved=_quick_node_info),
        _patched(services, get_node=_quick_get_node(services.get_node)),
    )
    # Module attributes: patched for this call only, one call at a time.
    with _lock, patches[0], patches[1], contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            start_command.main(args=list(args), prog_name="ray start", standalone_mode=False)
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"`ray start` exited with {e.code}") from None
        except Exception as e:
            raise RuntimeError(f"`ray start` failed: {e}") from e
    if "started" not in box:
        raise RuntimeError("`ray start` returned without starting a raylet")
    return box["started"]
