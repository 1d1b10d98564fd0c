"""Copy large files from the login node in parallel byte ranges, resumable segment by segment.

    files ──▶ segments (≤ SEGMENT bytes each) ──▶ queue ──▶ N streams ──▶ pwrite into <file>.part
                                                            │
                                             <file>.part.done: one finished segment offset per line

Each stream reads one range at a time through a RangeReader (runner.range_reader(): a file here, or
its own SSH connection to the login node, each with its own encryption thread). A segment is recorded
as done only after its bytes are on disk (fdatasync), so an interrupted copy resumes with the segments it
lacks; the caller verifies the whole file (sha256) before it counts, and a file that does not verify is
copied again from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from raybridge.errors import RaybridgeError

SEGMENT = 64 << 20
# One stream per core of this machine, up to 4: each stream's bytes are decrypted by a process of their
# own (ssh), and more streams than cores only make them take turns (scripts/bench-tunnel).
STREAMS = max(1, min(4, os.cpu_count() or 1))


class RangeReader(Protocol):
    def read(self, path: str, offset: int, length: int, sink: Callable[[bytes | memoryview], None]) -> None:
        """Hand bytes [offset, offset+length) of path to sink, in order; raise if fewer arrive. sink
        uses each piece before it returns (a reader may reuse its buffer)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Item:
    source: str  # path on the login node
    target: Path  # the finished file; bytes go to <target>.part first
    size: int


@dataclass(frozen=True)
class Segment:
    item: Item
    offset: int
    length: int


class Digest:
    """sha256 of one file, computed in order as its segments land, from the page cache (one
    finisher thread calls landed(), so hashing overlaps the copy and never stalls a stream)."""

    def __init__(self, item: Item, fd: int, lengths: dict[int, int]):
        self.item, self.fd, self.lengths = item, fd, lengths
        self.h = hashlib.sha256()
        self.next = 0
        self.finished: set[int] = set()
        self.hexdigest: str | None = None

    def landed(self, offset: int) -> None:
        self.finished.add(offset)
        while self.hexdigest is None and self.next in self.finished:
            end = self.next + self.lengths[self.next]
            while self.next < end:
                data = os.pread(self.fd, min(4 << 20, end - self.next), self.next)
                if not data:
                    raise RaybridgeError(f"{part_of(self.item.target)} is shorter than expected")
                self.h.update(data)
                self.next += len(data)
            if self.next >= self.item.size:
                self.hexdigest = self.h.hexdigest()


def dd_argv(path: str, offset: int, length: int) -> list[str]:
    """GNU dd for bytes [offset, offset+length) of path, never through a link (the login node's side of a
    range, whichever client carries it)."""
    return [
        "dd",
        f"if={path}",
        "bs=4M",
        f"skip={offset}",
        f"count={length}",
        "status=none",
        "iflag=skip_bytes,count_bytes,nofollow",
    ]


def part_of(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def done_of(target: Path) -> Path:
    return target.with_name(target.name + ".part.done")


def segments(item: Item, size: int = SEGMENT) -> list[Segment]:
    if item.size == 0:
        return [Segment(item, 0, 0)]
    return [Segment(item, o, min(size, item.size - o)) for o in range(0, item.size, size)]


def finished_offsets(item: Item) -> set[int]:
    """Segments an earlier copy finished, if its .part is still the right size."""
    part, done = part_of(item.target), done_of(item.target)
    try:
        if part.stat().st_size != item.size:
            return set()
        return {int(x) for x in done.read_text().split() if x.isdigit()}
    except (OSError, ValueError):
        return set()


def copy(
    items: Iterable[Item],
    open_reader: Callable[[], RangeReader],
    streams: int = STREAMS,
    progress: Callable[[int], None] = lambda n: None,
    segment_size: int = SEGMENT,
) -> dict[Path, str]:
    """Copy every item's bytes into its .part file; returns each target's sha256 as copied (the
    caller compares it with the source's). progress(n) gets each n bytes written (or found done).
    The first error stops every stream and is raised here."""
    items = list(items)
    todo: queue.Queue[Segment] = queue.Queue()
    landed: queue.Queue[Segment | None] = queue.Queue()
    fds: dict[Path, int] = {}
    digests: dict[Path, Digest] = {}
    try:
        for item in items:
            done = finished_offsets(item)
            try:
                fd = os.open(part_of(item.target), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError as e:  # ELOOP: a link planted where the copy goes
                raise RaybridgeError(f"cannot write {part_of(item.target)}: {e.strerror}") from None
            fds[item.target] = fd
            os.ftruncate(fd, item.size)  # a resumed part keeps its bytes; a new one gets its size at once
            if not done:
                append_line(done_of(item.target), None)
            segs = segments(item, segment_size)
            digests[item.target] = Digest(item, fd, {x.offset: x.length for x in segs})
            pending = [x for x in segs if x.offset not in done]
            progress(item.size - sum(x.length for x in pending))
            for x in segs:
                if x.offset in done:
                    digests[item.target].landed(x.offset)
                else:
                    todo.put(x)
        _run(todo, landed, fds, digests, open_reader, streams, progress)
    finally:
        for fd in fds.values():
            os.close(fd)
    missing = [i.target for i in items if digests[i.target].hexdigest is None]
    if missing:
        raise RaybridgeError(f"internal error: {missing[0]} was copied but not hashed")
    return {t: d.hexdigest for t, d in digests.items() if d.hexdigest}


def append_line(path: Path, line: str | None) -> None:
    """Append to a segment record (None: start it empty), never through a link planted in its place."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if line else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        if line:
            os.write(fd, line.encode())
    finally:
        os.close(fd)


def _run(
    todo: queue.Queue[Segment],
    landed: queue.Queue[Segment | None],
    fds: dict[Path, int],
    digests: dict[Path, Digest],
    open_reader: Callable[[], RangeReader],
    streams: int,
    progress: Callable[[int], None],
) -> None:
    """The streams (each takes the next segment and writes it where it belongs) and one finisher
    (flush to disk, record the segment as done, hash what is now contiguous)."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def finisher() -> None:
        try:
            while (seg := landed.get()) is not None:
                os.fdatasync(fds[seg.item.target])  # on disk before it is recorded as done
                append_line(done_of(seg.item.target), f"{seg.offset}\n")
                digests[seg.item.target].landed(seg.offset)
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            errors.append(e)
            stop.set()

    def stream() -> None:
        reader = None
        try:
            while not stop.is_set():
                try:
                    seg = todo.get_nowait()
                except queue.Empty:
                    return
                reader = reader or open_reader()
                fd, pos = fds[seg.item.target], [seg.offset]

                def sink(data: bytes | memoryview, fd: int = fd, pos: list[int] = pos) -> None:
                    if stop.is_set():
                        raise Stopped()
                    os.pwrite(fd, data, pos[0])
                    pos[0] += len(data)
                    progress(len(data))

                if seg.length:
                    reader.read(seg.item.source, seg.offset, seg.length, sink)
                landed.put(seg)
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            errors.append(e)
            stop.set()
        finally:
            if reader is not None:
                with contextlib.suppress(Exception):
                    reader.close()

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(min(streams, todo.qsize()))]
    last = threading.Thread(target=finisher, daemon=True)
    last.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a Ctrl-C reaches this thread between joins
    except BaseException:
        stop.set()
        raise
    finally:
        landed.put(None)
        last.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])


class Stopped(RaybridgeError):
    """Another stream failed: this one stops too."""


def complete(item: Item) -> None:
    """The verified .part becomes the file; its segment record goes."""
    os.replace(part_of(item.target), item.target)
    done_of(item.target).unlink(missing_ok=True)


def discard(item: Item) -> None:
    part_of(item.target).unlink(missing_ok=True)
    done_of(item.target).unlink(missing_ok=True)
