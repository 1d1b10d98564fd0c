"""List Ray Train checkpoints on shared storage and copy them to this machine, verified.

Layout (raybridge.train writes it): <shared_dir>/runs/<run name>/checkpoint_*/...
A pull downloads into DEST/.partial-<checkpoint>/ (files as *.part until their sha256 matches), and
renames the folder to DEST/<checkpoint> only when every file is verified: an interrupted pull never
looks complete, and a re-run resumes, skipping files already verified.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raybridge.errors import RaybridgeError
from raybridge.runner import Runner

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    path: str
    files: int
    size: int
    mtime: float


def runs_dir(shared_dir: str) -> str:
    return posixpath.join(shared_dir, "runs")


def list_runs(runner: Runner, shared_dir: str) -> list[str]:
    return [d for d in runner.listdir(runs_dir(shared_dir)) if not d.startswith(".")]


def list_checkpoints(runner: Runner, run_dir: str) -> list[CheckpointInfo]:
    """Checkpoint folders of a run, oldest first (by name: Ray numbers them in order)."""
    r = runner.run(
        [
            "find",
            run_dir,
            "-mindepth",
            "1",
            "-maxdepth",
            "1",
            "-type",
            "d",
            "-name",
            "checkpoint_*",
            "-printf",
            "%f\\t%T@\\n",
        ],
        check=False,
    )
    if r.returncode != 0:
        raise RaybridgeError(f"no run folder {run_dir}")
    out = []
    for line in sorted(r.stdout.splitlines()):
        name, mtime = line.split("\t")
        files = manifest(runner, posixpath.join(run_dir, name), hashes=False)
        out.append(
            CheckpointInfo(
                name, posixpath.join(run_dir, name), len(files), sum(f.size for f in files), float(mtime)
            )
        )
    return out


def manifest(runner: Runner, folder: str, hashes: bool = True) -> list[FileEntry]:
    """Every file under folder with its size (and sha256, computed where the data is)."""
    r = runner.run(["find", folder, "-type", "f", "-printf", "%P\\t%s\\n"])
    sizes = dict(line.rsplit("\t", 1) for line in r.stdout.splitlines() if line)
    sums: dict[str, str] = {}
    if hashes and sizes:
        # sha256sum over the file list, run next to the data (login node), not over the network.
        script = 'cd "$1" && find . -type f -print0 | xargs -0 -r sha256sum'
        out = runner.run(["sh", "-c", script, "sh", folder], timeout=3600).stdout
        for line in out.splitlines():
            digest, _, name = line.partition("  ")
            sums[name.removeprefix("./")] = digest
    return [FileEntry(p, int(s), sums.get(p, "")) for p, s in sorted(sizes.items())]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pull(
    runner: Runner, folder: str, dest: Path, progress: Callable[[int, int], None] = lambda d, t: None
) -> Path:
    """Copy one checkpoint folder to dest/<name>, verified; resumable. Returns the final path."""
    name = posixpath.basename(folder.rstrip("/"))
    final = dest / name
    if final.exists():
        raise RaybridgeError(f"{final} already exists (remove it to pull again)")
    files = manifest(runner, folder)
    if not files:
        raise RaybridgeError(f"checkpoint {folder} is empty or missing")
    partial = dest / f".partial-{name}"
    partial.mkdir(parents=True, exist_ok=True)
    total = sum(f.size for f in files)
    done = 0
    progress(done, total)
    for entry in files:
        target = partial / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.stat().st_size == entry.size and sha256_of(target) == entry.sha256:
            done += entry.size  # verified by an earlier, interrupted pull
            progress(done, total)
            continue
        part = target.with_name(target.name + ".part")
        base = done
        runner.get(
            posixpath.join(folder, entry.path), str(part), lambda n, _t, b=base: progress(b + n, total)
        )
        if part.stat().st_size != entry.size or sha256_of(part) != entry.sha256:
            part.unlink(missing_ok=True)
            raise RaybridgeError(
                f"{entry.path}: copy does not match the source (size or sha256); run the pull again"
            )
        os.replace(part, target)
        done += entry.size
        progress(done, total)
    for p in partial.rglob("*.part"):  # leftovers of a killed pull that the manifest no longer lists
        p.unlink()
    os.replace(partial, final)
    return final
