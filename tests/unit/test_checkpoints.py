"""Checkpoint listings are hostile input: names with control characters, '..', links (local runner,
real find and sha256sum on a temp folder)."""

import os

import pytest

from raybridge.client import checkpoints as ck
from raybridge.errors import RaybridgeError
from raybridge.transport.runner import LocalRunner


@pytest.mark.parametrize("name", ["ok.bin", "model-1.pt", ".hidden", "a b", "checkpoint_000001"])
def test_safe_names(name):
    assert ck.safe_name(name)


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "x\x0by", "x\ny", "tab\t", "esc\x1b[31m", "del\x7f", "é", "x" * 256, " lead"],
)
def test_unsafe_names(name):
    assert not ck.safe_name(name)


@pytest.mark.parametrize("path", ["a/../b", "/etc/passwd", "a//b", "../x", "a/\n/b", ""])
def test_unsafe_paths(path):
    assert not ck.safe_relpath(path)


def test_a_name_that_used_to_inject_a_manifest_entry_is_refused(tmp_path):
    cp = tmp_path / "checkpoint_000001"
    (cp / "x\x0b..").mkdir(parents=True)
    (cp / "x\x0b.." / ".bashrc\t5").write_bytes(b"evil")
    (cp / "ok.bin").write_bytes(b"x" * 10)
    runner = LocalRunner()
    # The listing keeps the name whole (NUL-separated), so it is seen for what it is.
    assert ck.file_sizes(runner, str(cp)) == {"x\x0b../.bashrc\t5": 4, "ok.bin": 10}
    with pytest.raises(RaybridgeError, match="holds a file raybridge will not copy: 'x\\\\x0b../.bashrc"):
        ck.manifest(runner, str(cp))
    with pytest.raises(RaybridgeError, match="will not copy"):
        ck.pull(runner, str(cp), tmp_path / "dest")
    assert not (tmp_path / "dest" / ".partial-checkpoint_000001").exists()  # refused before writing


def test_backslashes_and_spaces_in_names_are_hashed_right(tmp_path):
    cp = tmp_path / "checkpoint_000002"
    cp.mkdir()
    (cp / "back\\slash name.bin").write_bytes(b"b" * 7)  # sha256sum escapes such names without -z
    dest = tmp_path / "dest"
    final = ck.pull(LocalRunner(), str(cp), dest)
    assert (final / "back\\slash name.bin").read_bytes() == b"b" * 7


def test_links_are_never_followed_and_targets_stay_inside(tmp_path):
    cp = tmp_path / "checkpoint_000003"
    (cp / "real").mkdir(parents=True)
    (cp / "real" / "w.pt").write_bytes(b"w")
    (cp / "passwd").symlink_to("/etc/passwd")
    (cp / "up").symlink_to(tmp_path)
    assert ck.file_sizes(LocalRunner(), str(cp)) == {"real/w.pt": 1}
    # A link planted in the partial folder (between an interrupted pull and its resume) that would
    # carry the next file outside DEST.
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / ".partial-checkpoint_000003").mkdir(parents=True)
    os.symlink(outside, dest / ".partial-checkpoint_000003" / "real")
    with pytest.raises(RaybridgeError, match="would be written outside"):
        ck.pull(LocalRunner(), str(cp), dest)
    assert list(outside.iterdir()) == []


def test_a_cut_listing_is_an_error():
    with pytest.raises(RaybridgeError, match="cut short"):
        ck.fields("a\x0010\x00b\x00", 2)
