"""Ray's logs outlive the job: at teardown each agent copies its node's Ray session logs from the
node-local temp folder to the job folder on shared storage, newest first, gzip-compressed, within a
size budget, before the temp folder is removed. Links are not followed; files are private (0600)."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import stat
from pathlib import Path

log = logging.getLogger(__name__)
BUDGET = 64 * 1024**2  # bytes of logs read per node: the newest files first
TAIL = 16 * 1024**2  # of a larger file, its end (where the failure is)


def session_logs(temp_dir: str) -> list[Path]:
    """Regular files under <temp_dir>/session_*/logs, newest first (links skipped)."""
    files = []
    for session in sorted(Path(temp_dir).glob("session_*")):
        if session.is_symlink() or not session.is_dir():
            continue  # session_latest is a link to one of the others
        for root, _dirs, names in os.walk(session / "logs"):
            for name in names:
                path = Path(root) / name
                with_stat = path.lstat()
                if stat.S_ISREG(with_stat.st_mode):
                    files.append((with_stat.st_mtime, path, session))
    return [p for _, p, _ in sorted(files, key=lambda t: t[0], reverse=True)]


def keep(temp_dir: str, dest: str, budget: int = BUDGET) -> int:
    """Copy the session logs to dest (<name>.gz, relative to the session's logs folder); returns
    how many files were kept. Never raises: teardown goes on whatever happens here."""
    kept, used = 0, 0
    try:
        files = session_logs(temp_dir)
        if files:
            os.makedirs(dest, mode=0o700, exist_ok=True)
        for path in files:
            size = path.lstat().st_size
            take = min(size, TAIL)
            if used + take > budget:
                continue
            logs_root = next(p for p in path.parents if p.name == "logs")
            target = Path(dest) / (str(path.relative_to(logs_root)) + ".gz")
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with (
                open(path, "rb") as src,
                os.fdopen(fd, "wb") as raw,
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out,
            ):
                if size > take:
                    src.seek(size - take)
                    out.write(f"[raybridge: the first {size - take} bytes were left out]\n".encode())
                shutil.copyfileobj(src, out, 1 << 20)
            used += take
            kept += 1
    except Exception as e:  # a full or read-only shared folder must not stop the teardown
        log.info(f"could not keep all of Ray's logs in {dest}: {e}")
    return kept
