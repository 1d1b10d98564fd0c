"""Cluster profiles (YAML) and the fully resolved request they become: ClusterSpec.

A profile holds what is stable for a site (partition, shared storage, environment setup); CLI flags
override it. Every value is validated here, so rendering and submission never see bad input.
"""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raybridge import trust
from raybridge.container import RUNTIMES, ContainerSpec
from raybridge.errors import ConfigError
from raybridge.layout import SharedDir
from raybridge.settings import DEFAULTS as AGENT_DEFAULTS
from raybridge.settings import MODULE, AgentSettings
from raybridge.settings import RESERVED as RESERVED_SETTINGS
from raybridge.transport.runner import LoginSpec

# Options raybridge sets itself; a user's extra directive may not override them. sbatch accepts any
# unambiguous prefix of a long option (`--comm` = `--comment`), so a prefix of one of these is refused too.
OWNED_LONG = frozenset(
    {
        "nodes", "ntasks", "ntasks-per-node", "cpus-per-task", "job-name", "output", "error", "mem",
        "mem-per-cpu", "time", "partition", "account", "qos", "gpus-per-node", "exclusive", "comment",
        "signal", "requeue", "no-requeue", "wrap", "array", "export", "export-file", "parsable", "wait",
        "no-kill", "open-mode",
    }
)  # fmt: skip
OWNED_SHORT = frozenset("NncJoetpAqaWk")
# sbatch 22.05's short options that take a value (the rest of a bundle like `-vJname` is that value).
SHORT_WITH_VALUE = frozenset("aAbBcdDeiJLMmnNopqStCFwxG")
SHORT_FLAGS = frozenset("HkOQsvWhVI")


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SLURM_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,-]{0,127}$")
# A Ray node label (Kubernetes syntax): [prefix/]name=value; Ray keeps ray.io/ for itself.
LABEL = re.compile(
    r"^(?!ray\.io/)([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?=([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$"
)
LABEL_HELP = "key=value: letters, digits, '-', '_', '.', an optional DNS prefix/ (not ray.io/)"
MEMORY = re.compile(r"^[1-9][0-9]*[KMGT]?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
IFACE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
HOST = re.compile(r"^[A-Za-z0-9_.:-]+$|^\[[0-9A-Fa-f:]+\]$")
TIME_FORMATS = [
    re.compile(p)
    for p in (
        r"^(?P<m>\d+)$",
        r"^(?P<m>\d+):(?P<s>\d{1,2})$",
        r"^(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2})$",
        r"^(?P<d>\d+)-(?P<h>\d{1,2})$",
        r"^(?P<d>\d+)-(?P<h>\d{1,2}):(?P<m>\d{1,2})$",
        r"^(?P<d>\d+)-(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2})$",
    )
]


@dataclass(frozen=True)
class Flag:
    """How a parameter is given on the command line: its names and the type typer parses."""

    names: tuple[str, ...]
    kind: Any = str  # int, str, bool (names then hold "--x/--no-x"), list[str] (repeatable)


Check = Callable[["_Validator", str, Any], Any]


def param(
    default: Any,
    check: Check,
    help: str = "",
    flag: Flag | None = None,
    cluster_only: bool = False,
    agent: bool = False,
    profile: bool = True,
) -> Any:
    """One parameter, declared once: its default, its check (bounds and syntax, with messages that
    name the key), its help, its command-line flag, whether it is fixed for the whole cluster (scale
    refuses it), whether it crosses into the allocation unchanged (an AgentSettings field of the same
    name; settings.py holds its default) and whether a profile may set it."""
    meta = {"check": check, "help": help, "flag": flag, "cluster_only": cluster_only, "agent": agent}
    return field(default=default, metadata={**meta, "profile": profile})


def _integer(low: int, high: int = 10**9) -> Check:
    return lambda v, key, x: v.integer(key, x, low, high)


def _optional_integer(low: int) -> Check:
    return lambda v, key, x: v.optional_integer(key, x, low)


def _boolean(v: _Validator, key: str, x: Any) -> bool:
    return v.boolean(key, x)


def _slurm_word(v: _Validator, key: str, x: Any) -> str | None:
    return v.optional_match(key, x, SLURM_WORD)


def _lines(v: _Validator, key: str, x: Any) -> tuple[str, ...]:
    return tuple(v.line(key, s) for s in v.str_list(key, x))


def _indexed_lines(v: _Validator, key: str, x: Any) -> tuple[str, ...]:
    return tuple(v.line(f"{key}[{i}]", s) for i, s in enumerate(v.str_list(key, x)))


def _labels(v: _Validator, key: str, x: Any) -> tuple[str, ...]:
    return tuple(v.match(f"{key}[{i}]", s, LABEL, LABEL_HELP) for i, s in enumerate(v.str_list(key, x)))


@dataclass(frozen=True)
class ClusterSpec:
    """One validated, fully resolved request for a Ray cluster in a Slurm allocation. Every parameter
    is declared here, once (param): the profile's keys, their checks, the CLI's flags and the settings
    that cross into the allocation are all derived from these declarations."""

    nodes: int = param(
        1, _integer(1, 100000), "Number of nodes.", Flag(("--nodes", "-N"), int), cluster_only=True
    )
    job_name: str = param(
        "raybridge",
        lambda v, k, x: v.match(k, x, SAFE_NAME, "letters, digits, '.', '_' and '-' (at most 64)"),
        "Slurm job name.",
        Flag(("--job-name",)),
    )
    partition: str | None = param(None, _slurm_word, "Slurm partition.", Flag(("--partition",)))
    account: str | None = param(None, _slurm_word, "Slurm account.", Flag(("--account",)))
    qos: str | None = param(None, _slurm_word, "Slurm QOS.", Flag(("--qos",)))
    time: str | None = param(
        None, lambda v, k, x: v.time(x), "Time limit (Slurm format).", Flag(("--time", "-t"))
    )
    cpus_per_node: int | None = param(
        None, _optional_integer(1), "CPUs per node.", Flag(("--cpus-per-node",), int)
    )
    gpus_per_node: int | None = param(
        None, _optional_integer(0), "GPUs per node.", Flag(("--gpus-per-node",), int), agent=True
    )
    memory_per_node: str | None = param(
        None, lambda v, k, x: v.memory(x), "Memory per node, e.g. 64G.", Flag(("--mem",))
    )
    exclusive: bool = param(True, _boolean, "Whole nodes (sbatch --exclusive).")
    interface: tuple[str, ...] = param(
        AGENT_DEFAULTS["interface"],
        lambda v, k, x: v.interfaces(x),
        "Network interfaces for Ray, in order of preference, or auto.",
        agent=True,
    )
    nccl_ib_hca: str | None = param(None, _slurm_word, "NCCL_IB_HCA for every node.")
    shared_dir: str = param(
        "~/raybridge",
        lambda v, k, x: v.path(k, x, allow_home=True),
        "Folder on shared storage (scripts, logs, job folders, runs).",
        agent=True,
    )
    node_tmp: str = param(
        AGENT_DEFAULTS["node_tmp"],
        lambda v, k, x: v.path(k, x, max_len=200),  # doctor.temp_path: the real limit
        "Node-local folder for Ray's temporary files.",
        agent=True,
    )
    python: str | None = param(
        None,
        lambda v, k, x: None if x is None else v.line(k, x),
        "The nodes' Python (default: raybridge's own on the login node, else python3).",
    )
    setup: tuple[str, ...] = param((), _indexed_lines, "Shell lines run before the agents (module load ...).")
    env: tuple[tuple[str, str], ...] = param(
        (), lambda v, k, x: v.env(x), "Environment variables for every node."
    )
    sbatch_args: tuple[str, ...] = param(
        (),
        lambda v, k, x: v.sbatch_args(x),
        "Extra sbatch option (repeatable).",
        Flag(("--sbatch-arg",), list[str]),
    )
    ray_args: tuple[str, ...] = param(
        AGENT_DEFAULTS["ray_args"], _lines, "Extra `ray start` options.", agent=True
    )
    ray_start: str = param(
        AGENT_DEFAULTS["ray_start"],
        lambda v, k, x: v.choice(k, x, ("agent", "command")),
        "agent: Ray's launcher inside the agent (fast); command: `ray start`.",
        agent=True,
    )
    object_store_fraction: float = param(
        AGENT_DEFAULTS["object_store_fraction"],
        lambda v, k, x: v.fraction(k, x),
        "Share of a node's memory for Ray's object store.",
        agent=True,
    )
    ready_timeout: int = param(
        AGENT_DEFAULTS["ready_timeout"], _integer(10, 86400), "Seconds for every node to join.", agent=True
    )
    auth: bool = param(AGENT_DEFAULTS["auth"], _boolean, "Ray token authentication.", agent=True)
    spare_nodes: int = param(
        0,
        _integer(0, 1000),
        "Extra nodes that take over when one fails.",
        Flag(("--spare-nodes",), int),
        cluster_only=True,
    )
    replace_lost: int = param(
        0,
        _integer(0, 1000),
        "Submit a replacement node job when a node dies (at most this many).",
        Flag(("--replace-lost",), int),
        cluster_only=True,
    )
    signal_seconds: int | None = param(
        None,
        _optional_integer(10),
        "Seconds before the time limit to ask training to checkpoint.",
        Flag(("--signal-before",), int),
        agent=True,
    )
    requeue: bool = param(
        False,
        _boolean,
        "Requeue after a time-limit/preemption checkpoint.",
        Flag(("--requeue/--no-requeue",), bool),
    )
    max_requeues: int = param(3, _integer(0, 100), "Requeues at most.")
    chain: int = param(
        1,
        _integer(1, 100),
        "`run`: at most this many allocations in a row, each queued while the one before runs "
        "(needs --signal-before; for sites without requeue).",
        Flag(("--chain",), int),
    )
    failure_detection_s: int = param(
        3, _integer(1, 300), "Failed 1-second health checks before Ray declares a node dead."
    )
    warm_workers: int = param(
        AGENT_DEFAULTS["warm_workers"],
        _integer(0, 16),
        "Idle Ray worker processes each node keeps ready for a new training worker group (0: none).",
        agent=True,
    )
    preload: tuple[str, ...] = param(
        AGENT_DEFAULTS["preload"],
        lambda v, k, x: v.modules(k, x),
        "Python modules Ray Train's workers (raybridge.train.make_trainer) import before they take work.",
        agent=True,
    )
    command: tuple[str, ...] = param((), _lines, "The driver command (batch mode).", profile=False)
    login: LoginSpec | None = param(
        None, lambda v, k, x: None if x is None else v.login(x), "The login node (remote mode)."
    )
    profile: str = "(none)"
    expect_versions: str | None = None  # set at submission (submission.complete); the nodes compare
    labels: tuple[str, ...] = param((), _labels, "Ray node labels for every node, key=value.", agent=True)
    container: ContainerSpec | None = param(
        None,
        lambda v, k, x: v.container(x),
        "Run the agents, Ray and the driver inside a container: runtime (charliecloud, podman, "
        "apptainer, pyxis), image, mounts, options (docs/containers.md).",
    )
    workdir: str | None = None  # set at submission (submission.complete): where the job's commands run
    serve: str | None = None  # `raybridge serve NAME`: the service this job is one generation of
    serve_overlap: int = 5  # minutes the next generation starts before this one's time limit
    serve_until: int | None = None  # `serve --until`: no generation is queued to start after this (epoch s)
    member_of: str | None = None  # a member job (`raybridge scale --add`): the cluster's job id
    min_nodes: int | None = param(
        None,
        _optional_integer(1),
        "Autoscaling: keep at least this many nodes.",
        Flag(("--min-nodes",), int),
        cluster_only=True,
    )
    max_nodes: int | None = param(
        None,
        _optional_integer(1),
        "Autoscaling on: Ray's autoscaler adds node jobs up to this many nodes.",
        Flag(("--max-nodes",), int),
        cluster_only=True,
    )
    idle_timeout: int = param(
        AGENT_DEFAULTS["idle_timeout"],
        _integer(5, 7 * 86400),
        "Autoscaling: release an added node idle this many seconds.",
        Flag(("--idle-timeout",), int),
        cluster_only=True,
        agent=True,
    )
    join_timeout: int = param(
        AGENT_DEFAULTS["join_timeout"],
        _integer(10, 7 * 86400),
        "Autoscaling: cancel an added node job not joined after this many seconds.",
        Flag(("--join-timeout",), int),
        cluster_only=True,
        agent=True,
    )

    @property
    def autoscaling(self) -> bool:
        return self.max_nodes is not None and not self.member_of

    @property
    def total_nodes(self) -> int:
        """Nodes to allocate: the training nodes plus hot spares."""
        return self.nodes + self.spare_nodes

    @property
    def layout(self) -> SharedDir:
        """The shared folder's paths (resolve a leading ~ first: with_home)."""
        return SharedDir(self.shared_dir)

    def job_dir(self, job_id: str) -> str:
        return self.layout.job(job_id)

    def agent_settings(self) -> AgentSettings:
        """What the script hands to the agents (render.py writes it as exports): the parameters
        declared agent=True as they are, and what the allocation derives from the rest."""
        same = {f.name: getattr(self, f.name) for f in PARAMS if f.metadata["agent"]}
        return AgentSettings(
            **same,
            nodes=self.total_nodes,
            train_workers=self.nodes,
            cpus_per_worker=self.cpus_per_node,
            versions=self.expect_versions,
            cluster_job=self.member_of,
            replace_lost=0 if self.member_of else self.replace_lost,
            min_nodes=self.min_nodes if self.autoscaling else None,
            max_nodes=self.max_nodes if self.autoscaling else None,
        )

    def with_home(self, home: str) -> ClusterSpec:
        """Resolve a leading ~ in shared_dir against the home folder where the job runs."""
        if self.shared_dir == "~" or self.shared_dir.startswith("~/"):
            return dataclasses.replace(self, shared_dir=home.rstrip("/") + self.shared_dir[1:])
        return self


PARAMS = tuple(f for f in dataclasses.fields(ClusterSpec) if "check" in f.metadata)
PROFILE_KEYS = {f.name for f in PARAMS if f.metadata["profile"]}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ClusterSpec)}


def reference() -> str:
    """The profile keys as a Markdown table, from their declarations (docs/profile.md holds it)."""
    rows = ["| key | default | flag | what |", "|---|---|---|---|"]
    for f in PARAMS:
        if not f.metadata["profile"]:
            continue
        if f.default is None:
            default = "—"
        else:
            value = {} if f.name == "env" else _plain(f.default)  # a mapping in the profile
            default = (
                "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"
            )
        flag = " ".join(f"`{n}`" for n in f.metadata["flag"].names) if f.metadata["flag"] else ""
        scope = " Fixed for the whole cluster (not with `scale`)." if f.metadata["cluster_only"] else ""
        rows.append(f"| `{f.name}` | {default} | {flag} | {f.metadata['help']}{scope} |")
    return "\n".join(rows) + "\n"


def _plain(value: Any) -> Any:
    return list(_plain(v) for v in value) if isinstance(value, tuple) else value


LOGIN_KEYS = {f.name for f in dataclasses.fields(LoginSpec)}
CONTAINER_KEYS = ("runtime", "image", "mounts", "options")
# The two container flags override the profile's `container:` mapping key by key.
CONTAINER_FLAGS = {"container_image": "image", "container_runtime": "runtime"}
# Characters the runtimes' own option syntax gives a meaning: Pyxis splits mounts at ',' and ':'.
MOUNT_PATH = re.compile(r"^/[^,:\n\r\0]*$")


# ------------------------------------------------------------------ finding profiles


def profile_dirs() -> list[Path]:
    """Where named profiles are looked up, in order."""
    dirs = [Path(p) for p in os.environ.get("RAYBRIDGE_PROFILE_PATH", "").split(os.pathsep) if p]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    dirs.append(config_home / "raybridge" / "profiles")
    dirs.append(Path(__file__).resolve().parents[2] / "configs")  # a source checkout
    return dirs


def list_profiles() -> list[tuple[str, Path]]:
    seen: dict[str, Path] = {}
    for d in profile_dirs():
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            seen.setdefault(p.stem, p)
    return sorted(seen.items())


def find_profile(name: str | None) -> Path | None:
    """A profile path from a name or path; None when no profile is given or configured."""
    name = name or os.environ.get("RAYBRIDGE_PROFILE") or None
    if name is None:
        default = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "raybridge/default.yaml"
        return default if default.is_file() else None
    if "/" in name or name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"profile file not found: {name}")
        return path
    for d in profile_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    known = ", ".join(n for n, _ in list_profiles()) or "none"
    raise ConfigError(f"unknown profile {show(name)} (known profiles: {known})")


def read_profile(path: Path) -> dict[str, Any]:
    check_owner(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read profile {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"profile {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"profile {path}{line} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path} must be a mapping of keys to values")
    unknown = sorted(set(map(str, data)) - PROFILE_KEYS)
    if unknown:
        raise ConfigError(
            f"profile {path}: unknown key {show(unknown[0])} (valid keys: {', '.join(sorted(PROFILE_KEYS))})"
        )
    return data


def check_owner(path: Path) -> None:
    """A profile's `setup` lines run as whoever uses it: a profile someone else could have written (the
    file, or its folder) is refused, as OpenSSH refuses such a config; root's (a site's) is fine."""
    me = os.getuid()
    try:
        folder, st = path.parent.stat(), path.stat()
    except OSError:
        return  # reading it says what is wrong
    if why := trust.folder_problem(str(path.parent), folder.st_uid, folder.st_mode, me):
        raise ConfigError(f"profile {path}: {why}")
    if st.st_uid not in (me, 0) or st.st_mode & trust.GROUP_OR_OTHER_WRITE:
        who = "is writable by others" if st.st_uid in (me, 0) else "belongs to another user"
        raise ConfigError(
            f"profile {path} {who} (mode {st.st_mode & 0o7777:o}): its setup lines would run as you "
            f"(fix: chmod go-w {path}, or use a copy of your own)"
        )


# ------------------------------------------------------------------ building a spec


def load_spec(profile: str | None = None, **overrides: Any) -> ClusterSpec:
    """Profile (by name or path, or the default one) + overrides (None = not given) → ClusterSpec."""
    path = find_profile(profile)
    values: dict[str, Any] = read_profile(path) if path else {}
    for flag, key in CONTAINER_FLAGS.items():
        if (value := overrides.pop(flag, None)) is not None:
            given = values.get("container")
            values["container"] = {**(given if isinstance(given, dict) else {}), key: value}
    for key, value in overrides.items():
        if key not in PROFILE_KEYS | {"command"}:
            raise ConfigError(f"unknown option {key!r}")
        if value is None or (key in ("sbatch_args", "ray_args") and not value):
            continue
        if key in ("sbatch_args", "ray_args"):
            value = list(values.get(key) or []) + list(value)
        values[key] = value
    where = f"profile {path}" if path else "options"
    spec = build_spec(values, where)
    return dataclasses.replace(spec, profile=str(path) if path else "(none)")


def build_spec(values: dict[str, Any], where: str = "options") -> ClusterSpec:
    """Check every parameter (its declaration's check; the default where none is given)."""
    v = _Validator(where)
    checked = {f.name: f.metadata["check"](v, f.name, values.get(f.name, f.default)) for f in PARAMS}
    spec = ClusterSpec(**checked)
    v.autoscaling(spec)
    v.chain(spec)
    return spec


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 4


def show(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut short without expanding it (a YAML alias bomb must not
    echo megabytes)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _Validator:
    """Type and value checks with messages that name the key and where it came from."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key[:80]} {problem}")

    def line(self, key: str, value: Any) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.fail(key, f"must be a string, got {type(value).__name__}")
        value = str(value)
        if "\n" in value or "\r" in value or "\0" in value:
            raise self.fail(key, "must not contain newlines")
        return value

    def integer(self, key: str, value: Any, minimum: int, maximum: int = 10**9) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            else:
                raise self.fail(key, f"must be a whole number, got {show(value)}")
        if not minimum <= value <= maximum:
            raise self.fail(key, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def optional_integer(self, key: str, value: Any, minimum: int) -> int | None:
        return None if value is None else self.integer(key, value, minimum)

    def autoscaling(self, spec: ClusterSpec) -> None:
        """allocation <= min_nodes <= max_nodes: the allocation's own nodes are never released, so
        the cluster is never smaller than the allocation."""
        low, high, static = spec.min_nodes, spec.max_nodes, spec.total_nodes
        if high is None:
            if low is not None:
                raise self.fail("min_nodes", "needs max_nodes (autoscaling is on with max_nodes)")
            return
        if high < static:
            raise self.fail("max_nodes", f"is {high}, below the allocation's {static} nodes")
        if high > static + 1000:
            raise self.fail("max_nodes", f"may add at most 1000 nodes to the allocation's {static}")
        if low is not None and not static <= low <= high:
            raise self.fail(
                "min_nodes",
                f"must be between the allocation's {static} nodes and max_nodes {high}, got {low}",
            )

    def chain(self, spec: ClusterSpec) -> None:
        if spec.chain == 1:
            return
        if spec.requeue:
            raise self.fail("chain", "and requeue are two ways to continue after the time limit: give one")
        if not spec.signal_seconds:
            raise self.fail(
                "chain", "needs signal_seconds (--signal-before): each allocation checkpoints before it ends"
            )

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {show(value)}")
        return value

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(allowed)}, got {show(value)}")
        return value

    def fraction(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.05 <= value <= 0.8:
            raise self.fail(key, f"must be a number between 0.05 and 0.8, got {show(value)}")
        return float(value)

    def match(self, key: str, value: Any, pattern: re.Pattern[str], allowed: str = "") -> str:
        text = self.line(key, value)
        if not pattern.fullmatch(text):
            hint = f" (allowed: {allowed})" if allowed else ""
            raise self.fail(key, f"has characters Slurm or the shell would misread: {show(text)}{hint}")
        return text

    def optional_match(self, key: str, value: Any, pattern: re.Pattern[str]) -> str | None:
        return (
            None if value is None else self.match(key, value, pattern, "letters, digits, '.', '_', ',', '-'")
        )

    def time(self, value: Any) -> str | None:
        if value is None:
            return None
        text = self.line("time", value)
        if text.upper() in ("UNLIMITED", "INFINITE") or any(p.fullmatch(text) for p in TIME_FORMATS):
            return text
        raise self.fail("time", f"is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS ...): {show(text)}")

    def memory(self, value: Any) -> str | None:
        if value is None:
            return None
        text = self.line("memory_per_node", value).upper()
        if not MEMORY.fullmatch(text):
            raise self.fail("memory_per_node", f"must look like 4000M or 64G, got {show(value)}")
        return text

    def path(self, key: str, value: Any, allow_home: bool = False, max_len: int = 4096) -> str:
        text = self.line(key, value)
        if not (text.startswith("/") or (allow_home and (text == "~" or text.startswith("~/")))):
            raise self.fail(key, f"must be an absolute path, got {show(text)}")
        if len(text) > max_len:
            raise self.fail(key, f"must be at most {max_len} characters (Unix socket paths are short)")
        return text

    def str_list(self, key: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list | tuple):
            raise self.fail(key, f"must be a list of strings, got {type(value).__name__}")
        return list(value)

    def interfaces(self, value: Any) -> tuple[str, ...]:
        names = self.str_list("interface", value)
        if not names:
            raise self.fail("interface", "must name at least one interface, or 'auto'")
        return tuple(self.match("interface", n, IFACE, "an interface name such as ib0") for n in names)

    def modules(self, key: str, value: Any) -> tuple[str, ...]:
        names = self.str_list(key, value)
        return tuple(self.match(key, n, MODULE, "a module name such as ray.train.torch") for n in names)

    def env(self, value: Any) -> tuple[tuple[str, str], ...]:
        if value is None or value == ():
            return ()
        if not isinstance(value, dict):
            raise self.fail("env", "must be a mapping of variable names to values")
        out = []
        for name, val in value.items():
            if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
                raise self.fail("env", f"has an invalid variable name {show(name)}")
            if name in RESERVED_SETTINGS or name.startswith("RAY_AUTH_"):
                raise self.fail(
                    "env",
                    f"may not set {name}: raybridge sets it itself (from the profile's keys, e.g. auth)",
                )
            out.append((name, self.line(f"env.{name}", val)))
        return tuple(out)

    def sbatch_args(self, value: Any) -> tuple[str, ...]:
        """Extra sbatch options, each entry split as a shell (and sbatch) would: every option in it
        is checked, bundled short options letter by letter, long ones with sbatch's abbreviations."""
        out = []
        for arg in self.str_list("sbatch_args", value):
            arg = self.line("sbatch_args", arg)
            try:
                words = shlex.split(arg)
            except ValueError:
                raise self.fail("sbatch_args", f"has unbalanced quotes: {show(arg)}") from None
            if not words or not words[0].startswith("-"):
                raise self.fail(
                    "sbatch_args", f"entries must be options like --constraint=ib, got {show(arg)}"
                )
            for word in words:
                try:
                    owned = owned_option(word) if word.startswith("-") else None
                except ValueError as e:
                    raise self.fail("sbatch_args", f"{e} (in {show(arg)})") from None
                if owned:
                    raise self.fail(
                        "sbatch_args",
                        f"may not set {owned!r} (in {show(arg)}): raybridge sets it (use its own option)",
                    )
            out.append(arg)
        return tuple(out)

    def login(self, value: Any) -> LoginSpec:
        if isinstance(value, str):
            value = {"host": value}
        if not isinstance(value, dict):
            raise self.fail("login", "must be a host name or a mapping with 'host'")
        unknown = sorted(set(map(str, value)) - LOGIN_KEYS)
        if unknown:
            raise self.fail(
                "login", f"has unknown key {show(unknown[0])} (valid keys: {', '.join(sorted(LOGIN_KEYS))})"
            )
        host = self.line("login.host", value.get("host", ""))
        user = value.get("user")
        if "@" in host:
            user, host = host.rsplit("@", 1)
        if not host or not HOST.fullmatch(host):
            raise self.fail("login.host", f"is not a host name: {show(host)}")
        port = value.get("port")
        return LoginSpec(
            host=host,
            user=self.line("login.user", user) if user else None,
            port=self.integer("login.port", port, 1, 65535) if port is not None else None,
            identity_file=self._opt_line("login.identity_file", value.get("identity_file")),
            known_hosts=self._opt_line("login.known_hosts", value.get("known_hosts")),
            ssh_config=self._opt_line("login.ssh_config", value.get("ssh_config")),
            proxy_jump=self._opt_line("login.proxy_jump", value.get("proxy_jump")),
            accept_new_host_key=self.boolean(
                "login.accept_new_host_key", value.get("accept_new_host_key", False)
            ),
        )

    def container(self, value: Any) -> ContainerSpec | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail("container", "must be a mapping with runtime and image")
        unknown = sorted(set(map(str, value)) - set(CONTAINER_KEYS))
        if unknown:
            raise self.fail(
                "container", f"has unknown key {show(unknown[0])} (valid keys: {', '.join(CONTAINER_KEYS)})"
            )
        if "runtime" not in value or "image" not in value:
            missing = "runtime" if "runtime" not in value else "image"
            raise self.fail("container", f"needs {missing} (--container-{missing})")
        runtime = self.choice("container.runtime", value["runtime"], RUNTIMES)
        image = self.line("container.image", value["image"]).strip()
        if not image:
            raise self.fail("container.image", "must not be empty")
        if runtime in ("charliecloud", "apptainer") and not image.startswith("/"):
            raise self.fail(
                "container.image",
                f"must be an absolute path on shared storage for {runtime}, got {show(image)} "
                "(stage an image there first: docs/containers.md)",
            )
        if runtime == "pyxis" and "," in image:
            raise self.fail("container.image", f"must not contain ',' (Pyxis splits at it): {show(image)}")
        mounts = []
        for i, entry in enumerate(self.str_list("container.mounts", value.get("mounts"))):
            text = self.line(f"container.mounts[{i}]", entry)
            src, _, dst = text.partition(":")
            dst = dst or src
            for path in (src, dst):
                if not MOUNT_PATH.fullmatch(path) or path.rstrip("/") == "":
                    raise self.fail(
                        f"container.mounts[{i}]",
                        f"must be /host/path or /host/path:/container/path (no ',' or ':' inside a "
                        f"path; not /), got {show(text)}",
                    )
            mounts.append((os.path.normpath(src), os.path.normpath(dst)))
        options = _lines(self, "container.options", value.get("options"))
        return ContainerSpec(runtime, image, tuple(mounts), options)

    def _opt_line(self, key: str, value: Any) -> str | None:
        return None if value is None else self.line(key, value)


def owned_option(word: str) -> str | None:
    """The raybridge-owned sbatch option that this command-line word sets, if any; ValueError for a
    short option sbatch does not have."""
    if word.startswith("--"):
        name = word[2:].split("=", 1)[0]
        if not name:
            return None
        hit = next((o for o in sorted(OWNED_LONG) if o == name or o.startswith(name)), None)
        return f"--{hit}" if hit else None
    for letter in word[1:]:
        if letter in OWNED_SHORT:
            return f"-{letter}"
        if letter in SHORT_WITH_VALUE:
            return None  # the rest of the word is this option's value
        if letter not in SHORT_FLAGS:
            raise ValueError(f"-{letter} is not an sbatch option")
    return None


def time_to_seconds(text: str) -> int | None:
    """Slurm time string → seconds (None for unlimited)."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    for p in TIME_FORMATS:
        m = p.fullmatch(text)
        if m:
            g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
            return ((g.get("d", 0) * 24 + g.get("h", 0)) * 60 + g.get("m", 0)) * 60 + g.get("s", 0)
    raise ConfigError(f"not a Slurm time: {show(text)}")
