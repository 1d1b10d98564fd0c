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

from raybridge.client.profile import CONTAINER_FLAGS, PARAMS, PROFILE_KEYS, ClusterSpec, load_spec
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


def spec_option(f: Any) -> Any:
    """The typer option of a parameter declared with a Flag (profile.param): named like its profile
    key, None when not given (the profile decides)."""
    flag = f.metadata["flag"]
    return Annotated[flag.kind | None, typer.Option(*flag.names, help=f.metadata["help"])]


# The profile-overriding flags of every command that builds a cluster, from the declarations.
SPEC_OPTIONS: tuple[tuple[str, Any], ...] = tuple(
    (f.name, spec_option(f)) for f in PARAMS if f.metadata["flag"]
) + (
    (
        "container_image",
        Annotated[
            str | None, typer.Option(help="Container image (overrides the profile's container.image).")
        ],
    ),
    (
        "container_runtime",
        Annotated[
            str | None,
            typer.Option(help="Container runtime: charliecloud, podman, apptainer or pyxis."),
        ],
    ),
)
CLUSTER_ONLY: tuple[str, ...] = tuple(f.name for f in PARAMS if f.metadata["cluster_only"])


def flag_name(key: str) -> str:
    """The command-line name of a profile key (its declared flag's first name)."""
    flag = next(f.metadata["flag"] for f in PARAMS if f.name == key)
    return flag.names[0].split("/")[0] if flag else key


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
    overrides = {
        k: v for k, v in params.items() if (k in PROFILE_KEYS or k in CONTAINER_FLAGS) and k != "login"
    }
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
