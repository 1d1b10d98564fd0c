"""A per-job port plan, so that several clusters can share nodes without colliding.

Every job gets a block of ports derived from its job id, below Linux's ephemeral range; each port
is test-bound before use and, if any is busy, the next block is tried.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass

FIRST_PORT = 10000
LAST_PORT = 32000  # Linux's ephemeral range starts at 32768 by default
BLOCK = 256
NAMED = (
    "gcs",
    "dashboard",
    "client",
    "dashboard_agent",
    "dashboard_agent_grpc",
    "node_manager",
    "object_manager",
    "metrics",
    "runtime_env_agent",
)
WORKER_OFFSET = 16  # worker ports: block+16 .. block+255


@dataclass(frozen=True)
class PortPlan:
    gcs: int
    dashboard: int
    client: int
    dashboard_agent: int
    dashboard_agent_grpc: int
    node_manager: int
    object_manager: int
    metrics: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def all_ports(self) -> list[int]:
        named = [getattr(self, n) for n in NAMED]
        return named + list(range(self.min_worker, self.max_worker + 1))


def blocks() -> int:
    return (LAST_PORT - FIRST_PORT) // BLOCK


def plan_for_block(index: int) -> PortPlan:
    base = FIRST_PORT + (index % blocks()) * BLOCK
    named = {n: base + i for i, n in enumerate(NAMED)}
    return PortPlan(**named, min_worker=base + WORKER_OFFSET, max_worker=base + BLOCK - 1)


def first_block(job_id: str) -> int:
    # Spread consecutive job ids over the range (a multiplier coprime with the block count).
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return (int(digits) * 37) % blocks()


def is_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_plan(job_id: str, host: str = "", attempts: int = 32) -> PortPlan:
    """The first block, starting at the job's own, whose every port binds on this node."""
    start = first_block(job_id)
    for i in range(attempts):
        plan = plan_for_block(start + i)
        if all(is_free(p, host) for p in plan.all_ports()):
            return plan
    raise RuntimeError(
        f"no free block of {BLOCK} ports in {attempts} tries between {FIRST_PORT} and {LAST_PORT}"
    )
