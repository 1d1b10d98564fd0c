"""What the command modules share: option types (named like the profile keys they override), the
profile + flags → ClusterSpec step, the connection to the login node, and progress output."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from raybridge.client.profile import PROFILE_KEYS, ClusterSpec, load_spec
from raybridge.errors import RaybridgeError
from raybridge.transport.connect import open_runner
from raybridge.transport.runner import Runner

Profile = Annotated[str | None, typer.Option("--profile", "-p", help="Profile name or YAML path.")]
Login = Annotated[
    str | None, typer.Option(help="Login node [user@]host (or ~/.ssh/config alias): remote mode.")
]
AcceptKey = Annotated[
    bool, typer.Option("--accept-new-host-key", help="Trust and record an unknown host key.")
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the cluster (0 = no limit).")]
JobArg = Annotated[str | None, typer.Argument(help="Job id (default: your newest raybridge job).")]

# Flags that override a profile key: the parameter is named like the key.
Nodes = Annotated[int | None, typer.Option("--nodes", "-N", help="Number of nodes.")]
Partition = Annotated[str | None, typer.Option(help="Slurm partition.")]
Time = Annotated[str | None, typer.Option("--time", "-t", help="Time limit (Slurm format).")]
Account = Annotated[str | None, typer.Option(help="Slurm account.")]
Qos = Annotated[str | None, typer.Option(help="Slurm QOS.")]
Gpus = Annotated[int | None, typer.Option(help="GPUs per node.")]
Cpus = Annotated[int | None, typer.Option(help="CPUs per node.")]
Mem = Annotated[str | None, typer.Option("--mem", help="Memory per node, e.g. 64G.")]
JobName = Annotated[str | None, typer.Option(help="Slurm job name.")]
SbatchArgs = Annotated[
    list[str] | None, typer.Option("--sbatch-arg", help="Extra sbatch option (repeatable).")
]
Spare = Annotated[
    int | None, typer.Option("--spare-nodes", help="Extra nodes that take over when one fails.")
]
SignalSeconds = Annotated[
    int | None,
    typer.Option("--signal-before", help="Seconds before the time limit to ask training to checkpoint."),
]
ReplaceLost = Annotated[
    int | None,
    typer.Option(
        "--replace-lost", help="Submit a replacement node job when a node dies (at most this many)."
    ),
]
MinNodes = Annotated[
    int | None, typer.Option("--min-nodes", help="Autoscaling: keep at least this many nodes.")
]
MaxNodes = Annotated[
    int | None,
    typer.Option(
        "--max-nodes", help="Autoscaling on: Ray's autoscaler adds node jobs up to this many nodes."
    ),
]
IdleTimeout = Annotated[
    int | None,
    typer.Option("--idle-timeout", help="Autoscaling: release an added node idle this many seconds."),
]
JoinTimeout = Annotated[
    int | None,
    typer.Option(
        "--join-timeout", help="Autoscaling: cancel an added node job not joined after this many seconds."
    ),
]
Requeue = Annotated[
    bool | None,
    typer.Option("--requeue/--no-requeue", help="Requeue after a time-limit/preemption checkpoint."),
]


# The profile-overriding flags, declared once for every command that builds a cluster.
SPEC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("nodes", Nodes),
    ("partition", Partition),
    ("time", Time),
    ("account", Account),
    ("qos", Qos),
    ("gpus_per_node", Gpus),
    ("cpus_per_node", Cpus),
    ("memory_per_node", Mem),
    ("job_name", JobName),
    ("sbatch_args", SbatchArgs),
    ("spare_nodes", Spare),
    ("replace_lost", ReplaceLost),
    ("min_nodes", MinNodes),
    ("max_nodes", MaxNodes),
    ("idle_timeout", IdleTimeout),
    ("join_timeout", JoinTimeout),
    ("signal_seconds", SignalSeconds),
    ("requeue", Requeue),
)


def with_spec_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the profile-overriding flags to a command (after its own parameters). The command reads
    them through spec_from(ctx); they are not passed to it."""
    sig = inspect.signature(func, eval_str=True)
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
        for n, a in SPEC_OPTIONS
    ]
    params = list(sig.parameters.values())
    kinds = inspect.Parameter.VAR_KEYWORD
    params = [p for p in params if p.kind != kinds] + extra

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        for name, _ in SPEC_OPTIONS:
            kwargs.pop(name, None)
        return func(*args, **kwargs)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def spec_from(ctx: typer.Context, command: list[str] | None = None) -> ClusterSpec:
    """The command's profile, overridden by its flags (each named like its profile key; None = not
    given, the profile decides), plus --login and --accept-new-host-key."""
    params: dict[str, Any] = ctx.params
    overrides = {k: v for k, v in params.items() if k in PROFILE_KEYS and k != "login"}
    spec = load_spec(params.get("profile"), command=command or None, login=params.get("login"), **overrides)
    if params.get("accept_new_host_key"):
        if spec.login is None:
            raise RaybridgeError("--accept-new-host-key needs a login host (--login or the profile's login)")
        spec = dataclasses.replace(spec, login=dataclasses.replace(spec.login, accept_new_host_key=True))
    return spec


@contextlib.contextmanager
def connected(spec: ClusterSpec) -> Iterator[Runner]:
    runner = open_runner(spec.login)
    try:
        yield runner
    finally:
        runner.close()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
