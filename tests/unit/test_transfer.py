"""Parallel ranged copy (transfer.py) and the checkpoint pull on top of it, with real files and
threads: content, per-file sha256, resume after a failed stream, a bad resumed range caught."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from raybridge.client import checkpoints as ck
from raybridge.errors import RaybridgeError
from raybridge.transport import transfer
from raybridge.transport.runner import FileRanges, LocalRunner


def sources(tmp_path: Path) -> dict[str, bytes]:
    files = {"a.bin": os.urandom(10_000), "sub/b.bin": os.urandom(2_500), "empty": b"", "c": os.urandom(999)}
    for name, data in files.items():
        p = tmp_path / "src" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def items(tmp_path: Path, files: dict[str, bytes]) -> list[transfer.Item]:
    out = []
    for name, data in files.items():
        target = tmp_path / "dst" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        out.append(transfer.Item(str(tmp_path / "src" / name), target, len(data)))
    return out


class Recording(FileRanges):
    """Real reads; remembers which ranges were asked for, can fail after a number of them."""

    def __init__(self, log: list[tuple[str, int]], fail_after: int | None = None):
        self.log, self.fail_after = log, fail_after

    def read(self, path, offset, length, sink):
        with LOCK:
            if self.fail_after is not None and len(self.log) >= self.fail_after:
                raise RaybridgeError("link lost")
            self.log.append((os.path.basename(path), offset))
        super().read(path, offset, length, sink)


LOCK = threading.Lock()


def test_every_byte_lands_where_it_belongs_and_is_hashed_in_order(tmp_path):
    files = sources(tmp_path)
    its = items(tmp_path, files)
    moved = []
    sums = transfer.copy(its, FileRanges, streams=3, progress=moved.append, segment_size=1000)
    for item, data in zip(its, files.values(), strict=True):
        assert transfer.part_of(item.target).read_bytes() == data
        assert sums[item.target] == hashlib.sha256(data).hexdigest()
    assert sum(moved) == sum(len(d) for d in files.values())


def test_a_failed_stream_stops_the_copy_and_the_next_copy_reads_only_what_is_missing(tmp_path):
    files = sources(tmp_path)
    its = items(tmp_path, files)
    first: list[tuple[str, int]] = []
    with pytest.raises(RaybridgeError, match="link lost"):
        transfer.copy(its, lambda: Recording(first, fail_after=6), streams=1, segment_size=1000)
    assert len(first) == 6  # one stream, in order: six ranges landed before the failure
    second: list[tuple[str, int]] = []
    sums = transfer.copy(its, lambda: Recording(second), streams=2, segment_size=1000)
    assert not set(first) & set(second)  # nothing read twice
    total_ranges = sum(max(1, -(-len(d) // 1000)) for d in files.values() if d)
    assert len(first) + len(second) == total_ranges
    for item, data in zip(its, files.values(), strict=True):
        assert transfer.part_of(item.target).read_bytes() == data
        assert sums[item.target] == hashlib.sha256(data).hexdigest()


def test_pull_catches_a_resumed_range_that_went_bad_and_copies_that_file_again(tmp_path):
    run = tmp_path / "runs" / "r1" / "checkpoint_000002"
    run.mkdir(parents=True)
    data = os.urandom(3 * transfer.SEGMENT // 64 + 17)
    (run / "model.pt").write_bytes(data)
    (run / "meta.json").write_text("{}")
    dest = tmp_path / "dest"
    # An interrupted earlier pull: the whole part is there and recorded done, but one byte is wrong.
    partial = dest / ".partial-checkpoint_000002"
    partial.mkdir(parents=True, mode=0o700)  # as a pull leaves it
    bad = bytearray(data)
    bad[5] ^= 0xFF
    (partial / "model.pt.part").write_bytes(bytes(bad))
    (partial / "model.pt.part.done").write_text("0\n")
    with pytest.raises(RaybridgeError, match="model.pt: copy does not match the source"):
        ck.pull(LocalRunner(), str(run), dest)
    assert not (dest / "checkpoint_000002").exists()
    assert (partial / "meta.json").read_text() == "{}"  # the good file is kept
    final = ck.pull(LocalRunner(), str(run), dest, streams=3)
    assert (final / "model.pt").read_bytes() == data
    assert sorted(p.name for p in final.rglob("*")) == ["meta.json", "model.pt"]
