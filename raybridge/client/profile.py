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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raybridge.errors import ConfigError
from raybridge.layout import SharedDir
from raybridge.settings import DEFAULTS as AGENT_DEFAULTS
from raybridge.settings import RESERVED as RESERVED_SETTINGS
from raybridge.settings import AgentSettings
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
class ClusterSpec:
    """One validated, fully resolved request for a Ray cluster in a Slurm allocation."""

    nodes: int = 1
    job_name: str = "raybridge"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_node: int | None = None
    gpus_per_node: int | None = None
    memory_per_node: str | None = None
    exclusive: bool = True
    interface: tuple[str, ...] = AGENT_DEFAULTS["interface"]
    nccl_ib_hca: str | None = None
    shared_dir: str = "~/raybridge"
    node_tmp: str = AGENT_DEFAULTS["node_tmp"]
    python: str | None = None  # None: raybridge's own interpreter (local, no setup), else python3
    setup: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    sbatch_args: tuple[str, ...] = ()
    ray_args: tuple[str, ...] = AGENT_DEFAULTS["ray_args"]
    ray_start: str = AGENT_DEFAULTS["ray_start"]  # agent: Ray's launcher in the agent; command: `ray start`
    object_store_fraction: float = AGENT_DEFAULTS["object_store_fraction"]
    ready_timeout: int = AGENT_DEFAULTS["ready_timeout"]
    auth: bool = AGENT_DEFAULTS["auth"]
    spare_nodes: int = 0
    replace_lost: int = 0  # member jobs submitted to replace nodes that die, at most this many
    signal_seconds: int | None = None
    requeue: bool = False
    max_requeues: int = 3
    failure_detection_s: int = 3
    command: tuple[str, ...] = ()
    login: LoginSpec | None = None
    profile: str = "(none)"
    expect_versions: str | None = None  # set at submission (cluster.complete); the nodes compare
    labels: tuple[str, ...] = ()  # Ray node labels for every node, "key=value"
    member_of: str | None = None  # a member job (`raybridge scale --add`): the cluster's job id
    min_nodes: int | None = None  # autoscaling: member jobs keep the cluster at least this big
    max_nodes: int | None = None  # autoscaling on: Ray's autoscaler adds member jobs up to this many nodes
    idle_timeout: int = AGENT_DEFAULTS["idle_timeout"]
    join_timeout: int = AGENT_DEFAULTS["join_timeout"]

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
        """What the script hands to the agents (render.py writes it as exports)."""
        return AgentSettings(
            shared_dir=self.shared_dir,
            nodes=self.total_nodes,
            train_workers=self.nodes,
            interface=self.interface,
            node_tmp=self.node_tmp,
            ready_timeout=self.ready_timeout,
            auth=self.auth,
            object_store_fraction=self.object_store_fraction,
            ray_args=self.ray_args,
            ray_start=self.ray_start,
            cpus_per_worker=self.cpus_per_node,
            gpus_per_node=self.gpus_per_node,
            versions=self.expect_versions,
            cluster_job=self.member_of,
            labels=self.labels,
            replace_lost=0 if self.member_of else self.replace_lost,
            min_nodes=self.min_nodes if self.autoscaling else None,
            max_nodes=self.max_nodes if self.autoscaling else None,
            idle_timeout=self.idle_timeout,
            join_timeout=self.join_timeout,
        )

    def with_home(self, home: str) -> ClusterSpec:
        """Resolve a leading ~ in shared_dir against the home folder where the job runs."""
        if self.shared_dir == "~" or self.shared_dir.startswith("~/"):
            return dataclasses.replace(self, shared_dir=home.rstrip("/") + self.shared_dir[1:])
        return self


PROFILE_KEYS = {f.name for f in dataclasses.fields(ClusterSpec)} - {
    "command",
    "profile",
    "expect_versions",
    "member_of",
}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ClusterSpec)}
LOGIN_KEYS = {f.name for f in dataclasses.fields(LoginSpec)}


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


# ------------------------------------------------------------------ building a spec


def load_spec(profile: str | None = None, **overrides: Any) -> ClusterSpec:
    """Profile (by name or path, or the default one) + overrides (None = not given) → ClusterSpec."""
    path = find_profile(profile)
    values: dict[str, Any] = read_profile(path) if path else {}
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
    v = _Validator(where)

    def val(key: str) -> Any:
        """The given value, else the one default (ClusterSpec's field)."""
        return values.get(key, DEFAULTS.get(key))

    login = val("login")
    spec = ClusterSpec(
        nodes=v.integer("nodes", val("nodes"), minimum=1, maximum=100000),
        job_name=v.match(
            "job_name",
            val("job_name"),
            SAFE_NAME,
            "letters, digits, '.', '_' and '-' (at most 64)",
        ),
        partition=v.optional_match("partition", val("partition"), SLURM_WORD),
        account=v.optional_match("account", val("account"), SLURM_WORD),
        qos=v.optional_match("qos", val("qos"), SLURM_WORD),
        time=v.time(val("time")),
        cpus_per_node=v.optional_integer("cpus_per_node", val("cpus_per_node"), 1),
        gpus_per_node=v.optional_integer("gpus_per_node", val("gpus_per_node"), 0),
        memory_per_node=v.memory(val("memory_per_node")),
        exclusive=v.boolean("exclusive", val("exclusive")),
        interface=v.interfaces(val("interface")),
        nccl_ib_hca=v.optional_match("nccl_ib_hca", val("nccl_ib_hca"), SLURM_WORD),
        shared_dir=v.path("shared_dir", val("shared_dir"), allow_home=True),
        node_tmp=v.path("node_tmp", val("node_tmp"), max_len=200),  # doctor.temp_path: the real limit
        python=None if val("python") is None else v.line("python", val("python")),
        setup=tuple(v.line(f"setup[{i}]", s) for i, s in enumerate(v.str_list("setup", val("setup")))),
        env=v.env(val("env")),
        sbatch_args=v.sbatch_args(val("sbatch_args")),
        ray_args=tuple(v.line("ray_args", a) for a in v.str_list("ray_args", val("ray_args"))),
        ray_start=v.choice("ray_start", val("ray_start"), ("agent", "command")),
        object_store_fraction=v.fraction("object_store_fraction", val("object_store_fraction")),
        ready_timeout=v.integer("ready_timeout", val("ready_timeout"), minimum=10, maximum=86400),
        auth=v.boolean("auth", val("auth")),
        spare_nodes=v.integer("spare_nodes", val("spare_nodes"), minimum=0, maximum=1000),
        replace_lost=v.integer("replace_lost", val("replace_lost"), minimum=0, maximum=1000),
        signal_seconds=v.optional_integer("signal_seconds", val("signal_seconds"), 10),
        requeue=v.boolean("requeue", val("requeue")),
        max_requeues=v.integer("max_requeues", val("max_requeues"), minimum=0, maximum=100),
        failure_detection_s=v.integer(
            "failure_detection_s", val("failure_detection_s"), minimum=1, maximum=300
        ),
        command=tuple(v.line("command", c) for c in v.str_list("command", val("command"))),
        labels=tuple(
            v.match(f"labels[{i}]", x, LABEL, LABEL_HELP)
            for i, x in enumerate(v.str_list("labels", val("labels")))
        ),
        login=v.login(login) if login is not None else None,
        min_nodes=v.optional_integer("min_nodes", val("min_nodes"), 1),
        max_nodes=v.optional_integer("max_nodes", val("max_nodes"), 1),
        idle_timeout=v.integer("idle_timeout", val("idle_timeout"), minimum=5, maximum=7 * 86400),
        join_timeout=v.integer("join_timeout", val("join_timeout"), minimum=10, maximum=7 * 86400),
    )
    v.autoscaling(spec)
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
