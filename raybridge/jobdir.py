"""The job folder on shared storage: what the agents tell the CLI, as named paths and typed records.

<shared_dir>/jobs/<job id>/          (mode 0700)
    token              random auth token (0600)
    head.json          HeadRecord: the head's address and ports (rendezvous for the workers)
    nodes/<rank>.json  NodeRecord: one per node that joined
    cluster.json       ClusterRecord: everything a client needs; kept current by the head
    stop               flag: please tear down (`raybridge down`, the driver's end)
    preempt            flag: Slurm warned of the time limit or preemption; training checkpoints now
    warm.json          WarmRecord (agent/warm.py): the job and runtime env of the training workers, so
                       every node keeps an idle worker process ready for the next worker group
    logs/              Ray's start logs per node; logs/ray/<host>/ Ray's session logs, kept at teardown
    events/            one small JSON file per event written outside the head (driver start and end,
                       checkpoint restores): no two writers share a file; kept across requeues
    members/<job>.json MemberRecord of a worker job added by `raybridge scale`; <job>.release: drain it
    member.sbatch      the member script the head submits (lost-node replacement, Ray's autoscaler)

Records carry a schema version; a reader meets a newer one with one clear line, not a KeyError.
Records are written atomically (temp file + rename): a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from raybridge import trust
from raybridge.errors import RaybridgeError
from raybridge.layout import SharedDir

SCHEMA = 1

TOKEN = "token"
HEAD = "head.json"
NODES = "nodes"
CLUSTER = "cluster.json"
STOP = "stop"
PREEMPT = "preempt"
CHAIN_NEXT = "chain-next"  # `run --chain`: the job id of the next allocation, queued behind this one
DRIVER_RESTART = "driver-restart"
DRIVER_EXIT = "driver-exit"
WARM = "warm.json"
MAX_HEAD_LOSSES = 3  # a lost head is replaced (and the batch driver started again) this many times
LOGS = "logs"
EVENTS = "events"
MEMBERS = "members"
MEMBER_SCRIPT = "member.sbatch"

R = TypeVar("R", bound="Record")


class RecordError(RaybridgeError):
    """A record in the job folder that this raybridge cannot read."""


def now() -> float:
    return round(time.time(), 3)


@dataclass(frozen=True)
class JobDir:
    """Named paths inside one job folder (POSIX strings: the folder may be on the far side of SSH)."""

    path: str

    @classmethod
    def of(cls, shared_dir: str, job_id: str) -> JobDir:
        return cls(SharedDir(shared_dir).job(job_id))

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    @property
    def token(self) -> str:
        return self.join(TOKEN)

    @property
    def head(self) -> str:
        return self.join(HEAD)

    @property
    def nodes(self) -> str:
        return self.join(NODES)

    def node(self, rank: int | str) -> str:
        """A node's record: by rank, or "m<member job>-<rank>" for the nodes of a member job."""
        return self.join(NODES, f"{rank}.json")

    @property
    def members(self) -> str:
        """Member jobs (`raybridge scale --add`): one MemberRecord each, and their release flags."""
        return self.join(MEMBERS)

    def member(self, job_id: str) -> str:
        return self.join(MEMBERS, f"{job_id}.json")

    @property
    def member_script(self) -> str:
        """The member script (`up`/`run` render it at submission): what the head submits for a lost node
        or Ray's autoscaler, read only if it passes the trust rule (trust.read_private)."""
        return self.join(MEMBER_SCRIPT)

    def release(self, job_id: str) -> str:
        """Flag: the member job's nodes drain and leave the cluster (`raybridge scale --remove`)."""
        return self.join(MEMBERS, f"{job_id}.release")

    @property
    def cluster(self) -> str:
        return self.join(CLUSTER)

    @property
    def stop(self) -> str:
        return self.join(STOP)

    @property
    def preempt(self) -> str:
        return self.join(PREEMPT)

    @property
    def warm(self) -> str:
        return self.join(WARM)

    @property
    def chain_next(self) -> str:
        return self.join(CHAIN_NEXT)

    @property
    def logs(self) -> str:
        return self.join(LOGS)

    def generation(self, number: int) -> str:
        """Presence files of the agents taking part in head generation `number`, and its claim."""
        return self.join("generations", str(number))

    @property
    def driver_restart(self) -> str:
        """Flag: the driver stopped because its head was lost; the batch script starts it again."""
        return self.join(DRIVER_RESTART)

    @property
    def driver_exit(self) -> str:
        """The batch driver's exit code, when it ended on its own (absent: it was killed)."""
        return self.join(DRIVER_EXIT)

    @property
    def events(self) -> str:
        return self.join(EVENTS)

    def start_log(self, host: str) -> str:
        return self.join(LOGS, f"ray-start-{host}.log")

    def kept_logs(self, host: str) -> str:
        """Where a node's Ray session logs are kept after its agent stopped (gzip files)."""
        return self.join(LOGS, "ray", host)


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class Record:
    KIND: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schema"] = SCHEMA
        return data

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "") -> R:
        """Parse a record; unknown keys (a newer raybridge of the same schema) are ignored."""
        where = where or cls.KIND
        if not isinstance(data, dict):
            raise RecordError(f"{where}: not a {cls.KIND} record")
        schema = data.get("schema", SCHEMA)  # records from before the version field: same fields
        if schema != SCHEMA:
            raise RecordError(
                f"{where} was written by another raybridge version (record schema {schema}, this "
                f"raybridge reads {SCHEMA}): use the same raybridge on the login node and in the job"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise RecordError(f"{where}: incomplete {cls.KIND} record ({e})") from None


@dataclass(frozen=True)
class HeadRecord(Record):
    """The head's rendezvous: published as soon as its GCS serves, so nodes can join."""

    KIND: ClassVar[str] = "head"
    ip: str
    hostname: str
    interface: str
    ports: dict[str, int]
    gcs_up_at: float
    ray_dirs: dict[str, str] | None = None  # the head's temp and session folders (fast join)
    up_at: float | None = None  # the head's raylet registered
    rank: int | None = None
    generation: int = 0  # 0 for the first head; +1 each time a head is lost and replaced

    @property
    def gcs_address(self) -> str:
        return f"{self.ip}:{self.ports['gcs']}"


@dataclass(frozen=True)
class NodeRecord(Record):
    """One node as its agent recorded it, merged on the head with what the GCS says of it."""

    KIND: ClassVar[str] = "node"
    ip: str
    rank: int | None = None
    hostname: str | None = None
    interface: str | None = None
    cpus: int | None = None
    gpus: int | None = None
    memory_bytes: int | None = None
    object_store_bytes: int | None = None
    ports: dict[str, int] | None = None
    joined_at: float | None = None
    restarts: int = 0
    ray_started_by: str | None = None  # "agent" (in-process launcher) or "ray start"
    ray_start_reason: str | None = None  # why `ray start` was used, when it was
    temp_dir: str | None = None  # Ray's node-local folder (its logs while the job runs)
    generation: int = 0  # the head generation this node joined
    member_job: str | None = None  # the member job that brought this node (`raybridge scale`)
    # From the GCS (on the head): Ray's view of the node.
    node_id: str | None = None
    alive: bool | None = None
    ray_hostname: str | None = None
    ray_cpus: float | None = None
    ray_gpus: float | None = None
    died_at: float | None = None  # when Ray marked it dead


@dataclass(frozen=True)
class ClusterRecord(Record):
    """Everything a client needs about one cluster; the head keeps it current."""

    KIND: ClassVar[str] = "cluster"
    job_id: str
    state: str  # starting | ready | recovering (a new head is starting) | failed | stopped
    expected_nodes: int
    job_dir: str
    job_name: str = ""
    auth: str = "token"  # token | none
    token_path: str | None = None
    restart_count: int = 0  # requeues so far
    head: HeadRecord | None = None
    address: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    dashboard_url: str | None = None
    nodes: tuple[NodeRecord, ...] = ()
    error: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    head_up_at: float | None = None
    nodes_alive_at: float | None = None
    ready_at: float | None = None
    updated_at: float | None = None
    stopped_at: float | None = None
    generation: int = 0  # head generation: +1 each time the head was lost and replaced
    # What happened, in order: {"at", "event", "node", "detail"}; e.g. head_lost, head_replaced.
    events: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> ClusterRecord:
        rec = super().from_dict(data, where)
        head = HeadRecord.from_dict(rec.head, where) if isinstance(rec.head, dict) else rec.head
        nodes = tuple(NodeRecord.from_dict(n, where) if isinstance(n, dict) else n for n in rec.nodes or ())
        return dataclasses.replace(rec, head=head, nodes=nodes, events=tuple(rec.events or ()))

    @property
    def alive_nodes(self) -> int:
        return sum(1 for n in self.nodes if n.alive)

    @property
    def timestamps(self) -> dict[str, float]:
        return {k: v for k, v in self.to_dict().items() if k.endswith("_at") and v is not None}

    def with_changes(self, **changes: Any) -> ClusterRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MemberRecord(Record):
    """A worker-only Slurm job whose nodes joined the cluster (written by `raybridge scale --add`)."""

    KIND: ClassVar[str] = "member"
    job_id: str
    cluster_job: str
    nodes: int = 1
    partition: str | None = None
    gpus_per_node: int | None = None
    labels: tuple[str, ...] = ()
    submitted_at: float | None = None
    script: str | None = None
    tags: dict[str, str] | None = None  # Ray's autoscaler's tags; None: not added by the autoscaler
    released_at: float | None = None  # the autoscaler released it (idle, or it did not join in time)


# ------------------------------------------------------------------ local files (on the nodes)


_EVENT_SEQ = itertools.count()


def add_event(folder: JobDir, event: str, node: str, detail: str = "") -> None:
    """Record an event from outside the head (the driver, a training worker): a file of its own, so
    that no writer races another or the head's cluster.json. Never fails the caller."""
    entry = {"at": now(), "event": event, "node": node, "detail": detail[:300]}
    # Unique per writer: two events of one process in the same millisecond are two files.
    name = f"{entry['at']:.3f}-{os.getpid()}-{next(_EVENT_SEQ)}-{event}.json"
    with contextlib.suppress(OSError):
        write_json(posixpath.join(folder.events, name), entry)


def event_times(folder: JobDir) -> dict[str, list[float]]:
    """The times of the events add_event wrote, by kind, from their file names alone."""
    out: dict[str, list[float]] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(folder.events):
            parts = name.removesuffix(".json").split("-", 3)  # the name add_event gives it
            if len(parts) == 4 and name.endswith(".json"):
                with contextlib.suppress(ValueError):
                    out.setdefault(parts[3], []).append(float(parts[0]))
    return out


def to_text(record: Record) -> str:
    """A record as written to a file (for writers on the far side of a Runner)."""
    return json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n"


def write(path: str | Path, record: Record, mode: int = 0o600) -> None:
    write_json(path, record.to_dict(), mode)


def read(path: str | Path, kind: type[R]) -> R | None:
    """The record at path, or None if there is none (yet); RecordError if it cannot be read."""
    data = read_json(path)
    return None if data is None else kind.from_dict(data, str(path))


def write_json(path: str | Path, data: dict[str, Any] | list[Any], mode: int = 0o600) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    trust.write_atomic(str(path), json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def parse(text: str | None, kind: type[R], where: str) -> R | None:
    """A record from text read elsewhere (over SSH): None for no file or a partial write."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return kind.from_dict(data, where)
