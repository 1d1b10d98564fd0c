"""Image staging: a container image prepared once on shared storage, in the runtime's own format, so
that N nodes read one copy instead of each fetching it (`raybridge image stage`).

    charliecloud  a folder (from a folder or a tar archive: `ch-image export`, `docker export`, ...)
    apptainer     NAME.sif   (apptainer build; the source: docker://..., docker-archive:..., a .def)
    podman        NAME.tar   (an OCI archive: podman save --format oci-archive, after a pull if needed)
    pyxis         NAME.sqsh  (enroot import; the source: docker://...)

The work happens where the shared folder is (the login node, over SSH from a laptop), into a hidden
temporary name that is renamed into place when complete: a job never sees half an image. Progress is
the bytes written so far.
"""

from __future__ import annotations

import posixpath
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from raybridge import container
from raybridge.client import doctor
from raybridge.client.profile import SAFE_NAME, ClusterSpec
from raybridge.errors import CommandError, ConfigError, RaybridgeError
from raybridge.transport.runner import Runner

SUFFIX = {"charliecloud": "", "apptainer": ".sif", "podman": ".tar", "pyxis": ".sqsh"}
ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst", ".tar.bz2")


@dataclass(frozen=True)
class Staged:
    path: str
    size: int
    seconds: float


def destination(spec: ClusterSpec, runtime: str, name: str) -> str:
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"image name {name!r} may hold only letters, digits, '.', '_' and '-'")
    return spec.layout.join("images", name + SUFFIX[runtime])


def commands(runtime: str, source: str, target: str) -> list[list[str]]:
    """What builds the image at target (the temporary name) from source."""
    if runtime == "charliecloud":
        if source.endswith(ARCHIVES):
            # Device files need root; ch-run mounts the host's /dev over the image's anyway.
            untar = ["tar", "-x", "--no-same-owner", "--exclude=./dev/*", "--exclude=dev/*", "-f", source]
            return [["mkdir", "-m", "0755", "--", target], [*untar, "-C", target]]
        return [
            ["mkdir", "-m", "0755", "--", target],
            ["cp", "-a", "--no-preserve=ownership", "--", source.rstrip("/") + "/.", target],
        ]
    if runtime == "apptainer":
        return [["apptainer", "build", "--force", target, source]]
    if runtime == "podman":
        return [
            ["sh", "-c", 'podman image exists "$1" || podman pull "$1"', "sh", source],
            ["podman", "save", "--format", "oci-archive", "-o", target, source],
        ]
    if runtime == "pyxis":
        return [["enroot", "import", "-o", target, source]]
    raise ValueError(f"unknown container runtime {runtime!r}")


def stage(
    spec: ClusterSpec,
    runner: Runner,
    runtime: str,
    source: str,
    name: str,
    replace: bool = False,
    on_progress: Callable[[int, float], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> Staged:
    """Prepare source as the image `name` under <shared_dir>/images; its path. A source that is a
    local path must exist where the shared folder is."""
    if runtime not in container.RUNTIMES:
        raise ConfigError(f"unknown container runtime {runtime!r} (one of {', '.join(container.RUNTIMES)})")
    if not source or "\n" in source or source.startswith("-"):
        raise ConfigError(f"not an image source: {source!r}")
    dest = destination(spec, runtime, name)
    trusted = doctor.shared_trust(spec, runner)  # what the nodes will run goes there
    if trusted.status == "fail" and not trusted.detail.startswith("cannot check"):
        raise RaybridgeError(trusted.message())
    if runner.run(["test", "-e", dest], check=False).returncode == 0 and not replace:
        raise RaybridgeError(f"{dest} exists already (--replace to stage it again)")
    if source.startswith("/") and runner.run(["test", "-e", source], check=False).returncode != 0:
        raise RaybridgeError(f"image source {source} is not there")
    if on_start:
        on_start(dest)
    folder = posixpath.dirname(dest)
    runner.makedirs(spec.layout.path)
    runner.makedirs(folder, mode=0o755)
    tmp = posixpath.join(folder, f".staging-{name}-{secrets.token_hex(4)}{SUFFIX[runtime]}")
    started = time.monotonic()
    done = threading.Event()

    def report() -> None:
        while not done.wait(2.0):
            if on_progress:
                on_progress(size_of(runner, tmp), time.monotonic() - started)

    watcher = threading.Thread(target=report, name="raybridge-stage-progress", daemon=True)
    watcher.start()
    try:
        for argv in commands(runtime, source, tmp):
            try:
                runner.run(argv, timeout=None)
            except CommandError as e:
                first = (e.stderr or "").strip().splitlines()[:1] or [f"{argv[0]}: exit {e.returncode}"]
                raise RaybridgeError(f"staging {source} failed: {first[0][:300]}") from None
        # Nobody else may write what the nodes will run (the trust rule checks this at `up`).
        runner.run(["chmod", "go-w", "--", tmp])
        if replace:
            old = tmp + ".old"
            runner.run(["sh", "-c", 'if [ -e "$1" ]; then mv -- "$1" "$2"; fi; mv -- "$3" "$1"; rm -rf -- "$2"',
                        "sh", dest, old, tmp])  # fmt: skip
        else:
            runner.run(["mv", "-T", "--", tmp, dest])
    finally:
        done.set()
        runner.run(["rm", "-rf", "--", tmp], check=False, timeout=None)
    return Staged(dest, size_of(runner, dest), time.monotonic() - started)


def size_of(runner: Runner, path: str) -> int:
    r = runner.run(["du", "-sb", "--", path], check=False, timeout=30)
    try:
        return int(r.stdout.split()[0])
    except (IndexError, ValueError):
        return 0
