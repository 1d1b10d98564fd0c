"""What the batch script hands to the agents: one typed record, rendered as `export` lines and
parsed back on every node. Every default that crosses this boundary is stated here, once; the
profile's defaults for the same keys come from here too.

    script (render.py)  ──  AgentSettings.exports()  ──▶  environment  ──▶  AgentSettings.from_env()
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from raybridge.layout import SharedDir

PREFIX = "RAYBRIDGE_"
JOB_DIR_VAR = "RAYBRIDGE_JOB_DIR"  # derived in the script; the driver and raybridge.train read it
SUBMITTED_AT_VAR = "RAYBRIDGE_SUBMITTED_AT"  # sbatch's environment: when `up` submitted (the record's start)


# A Python module name (the profile's `preload`; what raybridge.preload is started with).
MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def env_name(field: str) -> str:
    """The variable that carries one AgentSettings field."""
    return PREFIX + field.upper()


class SettingsError(ValueError):
    """The environment does not hold valid agent settings (the job was not started by raybridge)."""


@dataclass(frozen=True)
class AgentSettings:
    """Everything an agent needs besides what Slurm itself provides (job id, rank)."""

    shared_dir: str  # the job folder is <shared_dir>/jobs/<job id>
    nodes: int = 1  # Ray nodes to expect (training nodes + spares)
    train_workers: int = 1  # Ray Train workers (the training nodes)
    interface: tuple[str, ...] = ("auto",)
    node_tmp: str = "/tmp"
    ready_timeout: int = 300
    auth: bool = True
    object_store_fraction: float = 0.3
    ray_args: tuple[str, ...] = ()
    ray_start: str = "agent"  # agent: Ray's launcher inside the agent (fast); command: `ray start`
    cpus_per_worker: int | None = None
    gpus_per_node: int | None = None
    versions: str | None = None  # "raybridge=.. ray=.. python=..": what submitted; envcheck compares
    # A member job (`raybridge scale --add`): its nodes join the Ray cluster of this job, as workers.
    cluster_job: str | None = None
    labels: tuple[str, ...] = ()  # Ray node labels, "key=value"
    replace_lost: int = 0  # the head submits a member job for a node that died, this many times
    # Ray's autoscaler on the head adds member jobs up to max_nodes in all (None: no autoscaling).
    min_nodes: int | None = None
    max_nodes: int | None = None
    idle_timeout: int = 60  # seconds an added node may be idle before it is released
    join_timeout: int = 600  # seconds from an added node's submission until its Ray must have joined
    signal_seconds: int | None = None  # Slurm's USR1 comes this long before the limit: the drain's deadline
    warm_workers: int = 1  # idle Ray worker processes kept per node for the next training worker group
    # What Ray Train's workers (raybridge.train.make_trainer) import before they take work: Ray Train
    # with torch, and torch's compiler front end, which DistributedDataParallel imports the first time it
    # wraps a model (0.7 s of CPU). A warm worker has them imported while it waits.
    preload: tuple[str, ...] = ("ray.train.torch", "torch._dynamo")
    # From Slurm, not from the script: SLURM_JOB_ID and SLURM_PROCID.
    job_id: str = ""
    rank: int = 0

    @property
    def job_dir(self) -> str:
        """The cluster's folder: this job's own, or for a member job the folder of the job it joins."""
        return self.layout.job(self.cluster_job or self.job_id)

    @property
    def layout(self) -> SharedDir:
        return SharedDir(self.shared_dir)

    @property
    def head_order(self) -> list[int]:
        """Which rank runs the Ray head: the first of these alive. Not the batch host (rank 0, where
        Slurm runs the batch script and the driver) while another node is there: a crashed head
        then leaves the batch script alive to carry on with a new head."""
        return [*range(1, self.nodes), 0]

    @property
    def head_rank(self) -> int:
        return self.head_order[0]

    @property
    def temp_dir(self) -> str:
        # Short on purpose: Ray's Unix sockets live under it (107-byte AF_UNIX limit).
        return f"{self.node_tmp.rstrip('/') or ''}/rb-{self.job_id}"

    def to_env(self) -> dict[str, str]:
        """The variables the script exports (values unquoted), in a stable order."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in FROM_SLURM:
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            out[env_name(f.name)] = _encode(value)
        return out

    def exports(self) -> list[str]:
        """`export` lines for the batch script, every value shell-quoted. RAYBRIDGE_JOB_DIR (for the
        driver and the training helpers) is derived in the script from the job id."""
        lines = [f"export {name}={shlex.quote(value)}" for name, value in self.to_env().items()]
        jobs = shlex.quote(self.layout.jobs)
        owner = shlex.quote(self.cluster_job) if self.cluster_job else '"$SLURM_JOB_ID"'
        lines.append(f"export RAYBRIDGE_JOB_DIR={jobs}/{owner}")
        return lines

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AgentSettings:
        """Parse what exports() wrote (plus Slurm's job id and rank); a missing or bad value is a
        SettingsError that names the variable."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in FROM_SLURM:
                continue
            name = env_name(f.name)
            raw = env.get(name)
            if raw is None:
                if f.default is dataclasses.MISSING:
                    raise SettingsError(f"{name} is not set: run inside a job started by raybridge")
                continue
            try:
                values[f.name] = _decode(f.type, raw)
            except ValueError:
                raise SettingsError(f"{name} has an invalid value {raw[:80]!r}") from None
        job_id = env.get("SLURM_JOB_ID") or ""
        if not job_id:
            raise SettingsError("SLURM_JOB_ID is not set: run inside a Slurm job")
        try:
            rank = int(env.get("SLURM_PROCID") or 0)
        except ValueError:
            raise SettingsError(f"SLURM_PROCID has an invalid value {env['SLURM_PROCID']!r}") from None
        return cls(**values, job_id=job_id, rank=rank)


FROM_SLURM = {"job_id", "rank"}
# What the script sets for raybridge itself: a profile's `env` may not override these.
RESERVED: frozenset[str] = frozenset(
    {env_name(f.name) for f in dataclasses.fields(AgentSettings) if f.name not in FROM_SLURM}
    | {JOB_DIR_VAR, SUBMITTED_AT_VAR}
)
DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(AgentSettings)
    if f.default is not dataclasses.MISSING and f.name not in FROM_SLURM
}


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return shlex.join(value)
    return str(value)


def _decode(kind: str, raw: str) -> Any:
    """kind is the field's annotation as text (`from __future__ import annotations`)."""
    base = kind.replace(" | None", "")
    if base == "bool":
        if raw not in ("true", "false"):
            raise ValueError(raw)
        return raw == "true"
    if base == "int":
        return int(raw)
    if base == "float":
        return float(raw)
    if base == "tuple[str, ...]":
        return tuple(shlex.split(raw))
    return raw
