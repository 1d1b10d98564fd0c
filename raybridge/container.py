"""Containers: how every raybridge and Ray process of a job runs inside the site's container runtime.

The batch script stays on the host (Slurm's signals, srun, the job's cgroup); each command it starts on a
node — the environment check, the agents (and with them Ray), the driver — runs inside the image:

    charliecloud  ch-run [-b SRC:DST]... [-c WORKDIR] IMAGE -- CMD       (a directory or SquashFS image)
    apptainer     apptainer exec [--bind SRC:DST]... [--pwd WORKDIR] [--nv] IMAGE CMD   (.sif)
    podman        podman run --rm --network=host --pid=host --ipc=host --userns=keep-id ... IMAGE CMD
    pyxis         srun --container-image=IMAGE --container-mounts=SRC:DST,... CMD   (enroot)

What every runtime must get right on an HPC node, and how it is done here: the node's own network (no
NAT: Ray advertises the node's fabric address; podman --network=host, the others never isolate it);
the user's own uid (Charliecloud and Apptainer never change it, podman --userns=keep-id, Pyxis without
--container-remap-root); the shared folder and the working directory at the same paths; Ray's temporary
folder on the node; the node's devices (/dev is the host's for ch-run and Apptainer; GPUs: Apptainer
--nv, podman CDI, Pyxis's own hooks); the job's environment (NCCL_*, RAY_*, the agents' settings) passed
through; and Slurm's signals reaching the program (ch-run and Pyxis exec it, Apptainer and podman
forward them).

Pure: rendering and the login node's checks (client/doctor.py) build on these words.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

RUNTIMES = ("charliecloud", "podman", "apptainer", "pyxis")
PROGRAM = {"charliecloud": "ch-run", "podman": "podman", "apptainer": "apptainer", "pyxis": "srun"}
NAMES = {"charliecloud": "Charliecloud", "podman": "podman", "apptainer": "Apptainer", "pyxis": "Pyxis"}
# Runtimes whose image is a path on shared storage (podman and Pyxis also take a registry reference).
PATH_IMAGES = ("charliecloud", "apptainer")


@dataclass(frozen=True)
class ContainerSpec:
    """The profile's `container:` mapping, validated (client/profile.py)."""

    runtime: str
    image: str
    mounts: tuple[tuple[str, str], ...] = ()  # (host path, path in the container)
    options: tuple[str, ...] = ()  # extra words for the runtime, as given

    @property
    def image_path(self) -> str | None:
        """The image's file or folder on shared storage (which the trust rule then covers); None for
        a registry reference, which the runtime fetches itself."""
        path = self.image
        if self.runtime == "podman":
            path = path.removeprefix("oci-archive:").removeprefix("docker-archive:")
        return path if self.runtime in PATH_IMAGES or path.startswith("/") else None


def binds(spec: ContainerSpec, shared_dir: str, workdir: str | None, node_tmp: str) -> list[tuple[str, str]]:
    """What is mounted, host path → container path: the shared folder, the working directory (where
    the driver's command runs) and Ray's node-local folder at the same paths, then the profile's own
    mounts. A folder already visible through a mount of a folder above it at the same path is left
    out; parents come before children (a bind needs its mount point)."""
    wanted = [(shared_dir, shared_dir)]
    if workdir:
        wanted.append((workdir, workdir))
    # ch-run and Apptainer share the host's /tmp already; the others get Ray's folder explicitly.
    if not (spec.runtime in ("charliecloud", "apptainer") and _under(node_tmp, "/tmp")):
        wanted.append((node_tmp, node_tmp))
    wanted += list(spec.mounts)
    out: list[tuple[str, str]] = []
    for src, dst in sorted(wanted, key=lambda m: (m[1].count("/"), m[1])):
        src, dst = os.path.normpath(src), os.path.normpath(dst)
        covered = any(
            s == d and src == dst and _under(dst, d) for s, d in out
        )  # visible through an identity mount above it
        if not covered and (src, dst) not in out:
            out.append((src, dst))
    return out


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True)
class Launch:
    """How the batch script starts a command inside the container. `words` define the script's
    `container` array; `here` goes before a command run on the batch host itself, `step` before the
    program of an srun step (for Pyxis, these are srun options)."""

    runtime: str
    words: tuple[str, ...]  # each already shell-quoted (or a quoted variable)

    @property
    def srun_options(self) -> bool:
        return self.runtime == "pyxis"

    def definition(self) -> str:
        """container=( ... ): the program, then one option per line (admins read this), the image last."""
        head = 0
        while head < len(self.words) and not self.words[head].startswith("-"):
            head += 1
        lines = [" ".join(self.words[:head])] if head else []
        lines += list(self.words[head:])
        return "container=(\n  " + "\n  ".join(lines) + "\n)"

    @property
    def here(self) -> str:
        if self.srun_options:
            return 'srun --overlap --nodes=1 --ntasks=1 -w "$SLURMD_NODENAME" "${container[@]}" '
        return '"${container[@]}" '

    @property
    def step(self) -> str:
        return '"${container[@]}" '


def launch(
    spec: ContainerSpec, mounts: list[tuple[str, str]], workdir: str | None, gpus: int, infiniband: bool
) -> Launch:
    """The runtime's words for one command on a node (see the module's docstring)."""
    q = shlex.quote
    image = q(spec.image)
    extra = [q(o) for o in spec.options]
    if spec.runtime == "charliecloud":
        words = ["ch-run", *(f"--bind={q(_pair(s, d))}" for s, d in mounts)]
        words += [f"--cd={q(workdir)}"] if workdir else []
        words += [*extra, image, "--"]
    elif spec.runtime == "apptainer":
        words = ["apptainer", "exec", *(f"--bind={q(_pair(s, d))}" for s, d in mounts)]
        words += [f"--pwd={q(workdir)}"] if workdir else []
        words += ["--nv"] if gpus else []
        words += [*extra, image]
    elif spec.runtime == "podman":
        # --rm: nothing left behind; host network, PIDs and IPC: Ray advertises the node's address,
        # the agents see (and stop) Ray's processes, and the driver shares the object store's memory.
        words = ["podman", "run", "--rm", "--network=host", "--pid=host", "--ipc=host", "--userns=keep-id"]
        words += ["--env-host", "--security-opt=label=disable"]
        words += [f"--volume={q(f'{s}:{d}')}" for s, d in mounts]  # -v /x alone: an anonymous volume
        words += [f"--workdir={q(workdir)}"] if workdir else []
        words += ["--device=nvidia.com/gpu=all"] if gpus else []  # CDI
        words += ["--device=/dev/infiniband"] if infiniband else []
        words += [*extra, image]
    elif spec.runtime == "pyxis":
        words = [f"--container-image={image}"]
        words += [f"--container-mounts={q(','.join(f'{s}:{d}' for s, d in mounts))}"] if mounts else []
        words += [f"--container-workdir={q(workdir)}"] if workdir else []
        # One container per node for the whole job: the steps after the first reuse it.
        words += ["--container-name=raybridge", *extra]
    else:
        raise ValueError(f"unknown container runtime {spec.runtime!r}")
    return Launch(spec.runtime, tuple(words))


def _pair(src: str, dst: str) -> str:
    return src if src == dst else f"{src}:{dst}"
