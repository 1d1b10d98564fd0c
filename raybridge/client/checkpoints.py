"""List Ray Train checkpoints on shared storage and copy them to this machine, verified.

Layout (raybridge.train writes it): <shared_dir>/runs/<run name>/checkpoint_*/...
A pull downloads into DEST/.partial-<checkpoint>/ (files as *.part until their sha256 matches; several
streams in parallel, transfer.py), and renames the folder to DEST/<checkpoint> only when every file is
verified: an interrupted pull never looks complete, and a re-run resumes, skipping files already
verified and the finished ranges of the others.

The run folder is written by the training code, by colleagues on project storage, by anyone holding the
cluster token: its names are hostile input. Listings cross the wire NUL-separated (a name may hold any
byte but NUL and '/'), and a checkpoint whose files cannot be copied safely — an absolute path, '..', a
control character, a name that is not valid UTF-8 — is refused with one line, before anything is written.
Symbolic links are never followed: `find` lists regular files only, and every local target is checked to
resolve inside the partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raybridge import train, trust
from raybridge.errors import RaybridgeError
from raybridge.layout import CHECKPOINT_MARKER, SharedDir
from raybridge.transport import transfer
from raybridge.transport.runner import Runner

CHUNK = 1024 * 1024
MARKER_MAX = 64 << 10  # a completion marker is a few hundred bytes
NAME = re.compile(r"[A-Za-z0-9._+=@,%~\\-][A-Za-z0-9._+=@,%~\\ -]{0,254}")  # a path component we write


def safe_name(name: str) -> bool:
    """A run, checkpoint or path component that is safe to create here: letters, digits, a few
    punctuation characters and inner spaces (no control characters, no '/'), not '.' or '..', at most
    255 bytes."""
    return bool(NAME.fullmatch(name)) and name not in (".", "..")


def safe_relpath(path: str) -> bool:
    """A relative path that stays inside its folder: every component safe (no '..', no absolute)."""
    return bool(path) and not path.startswith("/") and all(safe_name(p) for p in path.split("/"))


def fields(stdout: str, per_record: int) -> list[list[str]]:
    """NUL-separated `find -printf` output → records of per_record fields."""
    items = stdout.split("\0")
    if items and items[-1] == "":
        items.pop()
    if len(items) % per_record:
        raise RaybridgeError("the listing from the login node was cut short; run the command again")
    return [items[i : i + per_record] for i in range(0, len(items), per_record)]


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
    unsafe: int = 0  # files with names raybridge will not copy (pull refuses the checkpoint)
    complete: bool = False  # its completion marker is there (raybridge.train writes it last)


def runs_dir(shared_dir: str) -> str:
    return SharedDir(shared_dir).runs


def list_runs(runner: Runner, shared_dir: str) -> list[str]:
    return [d for d in runner.listdir(runs_dir(shared_dir)) if not d.startswith(".") and safe_name(d)]


def list_checkpoints(runner: Runner, run_dir: str) -> list[CheckpointInfo]:
    """Checkpoint folders of a run, oldest first (by name: Ray numbers them in order). Folders with
    names raybridge would not create (control characters, ...) are not listed; symlinks neither."""
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
            "%f\\0%T@\\0",
        ],
        check=False,
    )
    if r.returncode != 0:
        raise RaybridgeError(f"no run folder {run_dir}")
    out = []
    for name, mtime in sorted(fields(r.stdout, 2)):
        if not safe_name(name):
            continue
        path = posixpath.join(run_dir, name)
        sizes = file_sizes(runner, path)
        unsafe = sum(1 for f in sizes if not safe_relpath(f))
        complete = CHECKPOINT_MARKER in sizes
        out.append(
            CheckpointInfo(name, path, len(sizes), sum(sizes.values()), float(mtime), unsafe, complete)
        )
    return out


def choose(run: str, cps: list[CheckpointInfo], name: str | None = None) -> CheckpointInfo:
    """The checkpoint to pull: by name, or the newest complete one (the rule resume uses); an
    incomplete one is refused in one line."""
    done = [c for c in cps if c.complete]
    chosen = next((c for c in cps if c.name == name), None) if name else (done[-1] if done else None)
    if chosen is None and not name:
        raise RaybridgeError(
            f"run {run} has no complete checkpoint yet ({len(cps)} without their completion marker: "
            "still being written, or not saved by raybridge.train)"
        )
    if chosen is None:
        raise RaybridgeError(f"run {run} has no checkpoint {name!r} (have: {', '.join(c.name for c in cps)})")
    if not chosen.complete:
        newest = f"; the newest complete one is {done[-1].name}" if done else ""
        raise RaybridgeError(
            f"checkpoint {chosen.name} of run {run} is incomplete (no completion marker: still being "
            f"written, or its save failed){newest}"
        )
    return chosen


def file_sizes(runner: Runner, folder: str) -> dict[str, int]:
    """Every regular file under folder (relative path, as stored) → its size."""
    r = runner.run(["find", folder, "-type", "f", "-printf", "%P\\0%s\\0"])
    return {path: int(size) for path, size in fields(r.stdout, 2)}


def manifest(runner: Runner, folder: str, hashes: bool = True) -> list[FileEntry]:
    """Every regular file under folder with its size (and sha256, computed where the data is).
    RaybridgeError if any name could not be copied safely (see the module's doc)."""
    sizes = file_sizes(runner, folder)
    bad = [p for p in sizes if not safe_relpath(p)]
    if bad:
        raise RaybridgeError(
            f"{folder} holds a file raybridge will not copy: {bad[0][:120]!r} "
            f"({len(bad)} such name(s): absolute, '..', control or non-ASCII characters)"
        )
    sums = remote_sums(runner, folder) if hashes and sizes else {}
    return [FileEntry(p, s, sums.get(p, "")) for p, s in sorted(sizes.items())]


# OpenSSL's sha256 where the login node has the openssl command: it uses the CPU's SHA instructions,
# where coreutils' sha256sum (without OpenSSL) is ~4x slower, and the hash runs beside a pull.
# $2: one file (./NAME) left out, "" for none.
SUMS = """cd "$1" || exit 1
if command -v openssl >/dev/null 2>&1; then
  echo openssl
  find . -type f ! -path "$2" -print0 | xargs -0 -r openssl dgst -sha256 -r
else
  echo coreutils
  find . -type f ! -path "$2" -print0 | xargs -0 -r sha256sum -z
fi"""


def remote_sums(runner: Runner, folder: str, leave_out: str = "") -> dict[str, str]:
    """sha256 of every regular file under folder (but leave_out, a name at its top), computed next to
    the data (login node), not over the network. sha256sum -z: NUL-terminated lines, names as they are;
    openssl -r: a line each (the names pulled are checked to hold no control characters)."""
    skip = f"./{leave_out}" if leave_out else ""
    out = runner.run(["sh", "-c", SUMS, "sh", folder, skip], timeout=3600).stdout
    tool, _, out = out.partition("\n")
    sums = {}
    if tool == "openssl":
        for line in out.split("\n"):
            escaped = line.startswith("\\")  # some versions escape \\ and newlines as sha256sum does
            digest, sep, name = line.removeprefix("\\").partition(" *")
            if escaped:
                name = name.replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")
            if sep and len(digest) == 64:
                sums[name.removeprefix("./")] = digest
        return sums
    for line in out.split("\0"):
        digest, _, name = line.partition("  ")
        if name:
            sums[name.removeprefix("./")] = digest
    return sums


def marked_state_sum(runner: Runner, folder: str, sizes: dict[str, int]) -> str | None:
    """The state's sha256 as its completion marker names it (written when the checkpoint was saved),
    or None where the folder has no such marker. A link is not followed (the marker is read only when
    `find` listed it as a regular file, with nofollow)."""
    size = sizes.get(CHECKPOINT_MARKER)
    if train.STATE not in sizes or size is None or size > MARKER_MAX:
        return None
    r = runner.run(transfer.dd_argv(posixpath.join(folder, CHECKPOINT_MARKER), 0, size), check=False)
    return train.marked_sha256(r.stdout) if r.returncode == 0 else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pull(
    runner: Runner,
    folder: str,
    dest: Path,
    progress: Callable[[int, int], None] = lambda d, t: None,
    streams: int = transfer.STREAMS,
    complete: bool = False,
) -> Path:
    """Copy one checkpoint folder to dest/<name>, verified; resumable. Returns the final path.

    The login node hashes the files while `streams` parallel streams copy them in byte ranges
    (transfer.py), each file hashed here in order as its ranges land. complete: the copy must also be
    a complete checkpoint by the rule resume uses (its marker matches its state), checked here before
    it becomes visible; the state is then compared with its marker's hash only (a state that no longer
    matches its marker fails the pull either way)."""
    name = posixpath.basename(folder.rstrip("/"))
    if not safe_name(name):
        raise RaybridgeError(f"not a checkpoint name raybridge will create: {name[:100]!r}")
    final = dest / name
    if final.exists():
        raise RaybridgeError(f"{final} already exists (remove it to pull again)")
    files = manifest(runner, folder, hashes=False)
    if not files:
        raise RaybridgeError(f"checkpoint {folder} is empty or missing")
    # A complete checkpoint's state is checked against its marker (what was saved), not hashed a second
    # time on the login node: for raybridge.train's checkpoints that is nearly every byte.
    marked = marked_state_sum(runner, folder, {f.path: f.size for f in files}) if complete else None
    partial = dest / f".partial-{name}"
    # A real, private folder of ours (a link or a folder others can write would let them choose where the
    # copy's bytes go).
    if problem := trust.private_folder_problem(str(partial)):
        raise RaybridgeError(f"{partial} {problem}: remove it and pull again")
    root = partial.resolve()
    items: list[transfer.Item] = []
    for entry in files:
        target = partial / entry.path
        if not inside(target, root):  # safe_relpath already refused '..': this is the last word
            raise RaybridgeError(f"{entry.path[:120]!r} would be written outside {partial}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not inside(target, root):  # a folder on the way is a link planted meanwhile
            raise RaybridgeError(f"{entry.path[:120]!r} would be written outside {partial}")
        items.append(transfer.Item(posixpath.join(folder, entry.path), target, entry.size))

    remote: dict[str, str] = {}
    failed: list[BaseException] = []

    def hash_there() -> None:
        try:
            remote.update(remote_sums(runner, folder, train.STATE if marked else ""))
            if marked:
                remote[train.STATE] = marked
        except BaseException as e:  # noqa: BLE001  (reported below, in the caller's thread)
            failed.append(e)

    hasher = threading.Thread(target=hash_there, daemon=True)
    hasher.start()
    total = sum(f.size for f in files)
    done = [0]
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            done[0] += n
            progress(done[0], total)

    local: dict[Path, str] = {}
    # Verified by an earlier, interrupted pull (renamed from .part only after verification).
    fresh = [i for i in items if not (i.target.exists() and i.target.stat().st_size == i.size)]
    for i in items:
        if i not in fresh:
            local[i.target] = sha256_of(i.target)
            advance(i.size)
    progress(done[0], total)
    local.update(transfer.copy(fresh, runner.range_reader, streams=streams, progress=advance))
    hasher.join()
    if failed:
        raise failed[0]
    keep_verified(files, items, fresh, local, remote, marked=bool(marked))
    # Leftovers of a killed pull that the manifest no longer lists: only the copy's own names.
    for p in partial.rglob("*"):
        if p.name.endswith((".part", ".part.done")) and p.is_file() and not p.is_symlink():
            p.unlink()
    # The state's hash as copied (each byte is hashed once here), not a second read of it.
    state_sha = next((local.get(i.target) for i in items if i.target == partial / train.STATE), None)
    if complete and not train.is_complete(partial, state_sha):
        raise RaybridgeError(f"the copy of {name} is not a complete checkpoint (its marker does not match)")
    os.replace(partial, final)
    return final


def keep_verified(
    files: list[FileEntry],
    items: list[transfer.Item],
    fresh: list[transfer.Item],
    local: dict[Path, str],
    remote: dict[str, str],
    marked: bool = False,
) -> None:
    """Each file whose two hashes match becomes the file (a fresh copy: its .part renamed); any other is
    dropped, and the pull fails. marked: the state's hash is its completion marker's."""
    wrong = []
    for entry, item in zip(files, items, strict=True):
        if local.get(item.target) == remote.get(entry.path):
            if item in fresh:
                transfer.complete(item)
        else:
            wrong.append(entry.path)
            transfer.discard(item)
            item.target.unlink(missing_ok=True)
    if marked and wrong[:1] == [train.STATE]:
        raise RaybridgeError(
            f"{train.STATE}: copy does not match the sha256 its completion marker names (the checkpoint "
            "on shared storage or the copy is damaged); run the pull again, and if it fails again, "
            "pull another checkpoint"
        )
    if wrong:
        raise RaybridgeError(
            f"{wrong[0]}: copy does not match the source (sha256); run the pull again "
            f"({len(wrong)} file(s) to copy again, the others are kept)"
        )


def inside(path: Path, root: Path) -> bool:
    """path, with every link on the way resolved, is root or below it."""
    return path.resolve().is_relative_to(root)


def newest_complete(runner: Runner, run_dir: str) -> tuple[CheckpointInfo, int | None] | None:
    """The run's newest checkpoint with its completion marker (written last), and its step."""
    try:
        cps = list_checkpoints(runner, run_dir)
    except RaybridgeError:
        return None
    for cp in reversed(cps):
        meta = runner.read_text(posixpath.join(cp.path, CHECKPOINT_MARKER))
        if meta is None:
            continue
        try:
            step = json.loads(meta).get("step")
        except (ValueError, AttributeError):
            continue
        return cp, step if isinstance(step, int) else None
    return None
