"""The one trust rule for files on shared storage and shared hosts, as OpenSSH's StrictModes has it.

raybridge reads, follows or executes a file only if the user owns it and nobody else can write it, and
every folder on the way to it is the user's or root's and writable by nobody else — unless it has the
sticky bit (like /tmp), where others may create files but not replace ours. Otherwise it refuses in one
line that names the path and the fix. Links are not followed into a file (O_NOFOLLOW), and the checks
are made on the open file (fstat), so the file cannot be swapped between check and use.

Writing is the other half: write_atomic never writes through a name someone else chose.

Standard library only: the agents use it inside the allocation.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable

from raybridge.errors import RaybridgeError

GROUP_OR_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH
MAX_READ = 4 << 20  # a script or record: more is not raybridge's


class TrustError(RaybridgeError):
    """A file or folder someone else could have written."""


def _who(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"


def folder_problem(folder: str, uid: int, mode: int, me: int, own: bool = False) -> str | None:
    """The rule for one folder, in words (None: it passes). own: a folder that must be the user's
    (the shared folder itself), not root's."""
    if uid != me and (own or uid != 0):
        return (
            f"{folder} belongs to {_who(uid)}: raybridge uses files only in folders that you"
            + ("" if own else " or root")
            + " own (fix: use a shared_dir of your own)"
        )
    if mode & GROUP_OR_OTHER_WRITE and not mode & stat.S_ISVTX:
        return (
            f"{folder} is writable by others (mode {stat.S_IMODE(mode):o}): anyone who can write it could "
            f"replace what raybridge reads there (fix: chmod go-w {folder}, or ask for the sticky bit: "
            f"chmod +t {folder})"
        )
    return None


def ancestors(path: str) -> list[str]:
    """/, then every folder down to path itself."""
    chain = [path]
    while (parent := os.path.dirname(chain[-1])) != chain[-1]:
        chain.append(parent)
    return chain[::-1]


def chain_problem(run: Callable[[list[str]], str], folder: str, own: bool = True) -> str | None:
    """folder_problem for a folder and every folder above it, on the host where `run` runs commands
    (this one, or the login node over SSH): the folder itself must be the user's (own; else the user's
    or root's, as a site's image may be). None when all pass;
    the first problem otherwise. CommandError when the host cannot say (e.g. the folder is not there)."""
    real = run(["readlink", "-f", "--", folder]).strip() or folder
    me = int(run(["id", "-u"]).strip())
    chain = ancestors(real)
    lines = [line.split() for line in run(["stat", "-c", "%u %f", "--", *chain]).splitlines() if line.strip()]
    if len(lines) != len(chain):
        return f"cannot check the folders above {folder}"
    for path, (uid, mode) in zip(chain, lines, strict=True):
        if why := folder_problem(path, int(uid), int(mode, 16), me, own=own and path == real):
            return why
    return None


def check_folders(path: str) -> None:
    """Every folder from / down to path's own folder passes folder_problem."""
    me = os.getuid()
    for folder in ancestors(os.path.dirname(os.path.abspath(path))):
        try:
            st = os.stat(folder)
        except OSError as e:
            raise TrustError(f"cannot check {folder}: {e.strerror}") from None
        if why := folder_problem(folder, st.st_uid, st.st_mode, me):
            raise TrustError(why)


def read_private(path: str) -> str:
    """The text of a file that only this user can have written (the module's rule); TrustError if not."""
    check_folders(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TrustError(f"{path} does not exist") from None
    except OSError as e:
        why = "is a symbolic link" if os.path.islink(path) else e.strerror
        raise TrustError(f"{path} {why}: raybridge does not follow links to what it runs") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TrustError(f"{path} is not a regular file")
        if st.st_uid != os.getuid():
            raise TrustError(f"{path} belongs to {_who(st.st_uid)}, not to you: raybridge does not use it")
        if st.st_mode & GROUP_OR_OTHER_WRITE:
            raise TrustError(
                f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): raybridge does not use it "
                f"(fix: chmod go-w {path})"
            )
        data = b""
        while len(data) <= MAX_READ and (chunk := os.read(fd, MAX_READ + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_READ:
        raise TrustError(f"{path} is larger than {MAX_READ} bytes: not a file raybridge wrote")
    return data.decode("utf-8", errors="replace")


def write_atomic(path: str, text: str, mode: int = 0o600) -> None:
    """Write a file whole or not at all: a temp file beside it (mkstemp: a fresh name, O_EXCL, never a
    link someone planted), its mode set on the open file, then renamed over path."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def private_folder_problem(path: str) -> str | None:
    """Create path (mode 0700), or accept it only as this user's own private, real folder; the problem
    in words otherwise (someone else made it, or a link in its place, and would choose what goes in)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        return None
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"is open to others (mode {stat.S_IMODE(st.st_mode):o})"
    return None
