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
    (dest / ".partial-checkpoint_000003").mkdir(parents=True, mode=0o700)  # as a pull leaves it
    os.symlink(outside, dest / ".partial-checkpoint_000003" / "real")
    with pytest.raises(RaybridgeError, match="would be written outside"):
        ck.pull(LocalRunner(), str(cp), dest)
    assert list(outside.iterdir()) == []


def test_a_partial_folder_that_is_not_ours_alone_is_refused_and_part_files_are_not_links(tmp_path):
    cp = tmp_path / "checkpoint_000004"
    cp.mkdir()
    (cp / "w.pt").write_bytes(b"weights")
    (cp / "shard.part1.bin").write_bytes(b"s")  # a name with ".part" in it: the checkpoint's, kept
    dest = tmp_path / "dest"
    dest.mkdir()
    partial = dest / ".partial-checkpoint_000004"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    partial.symlink_to(elsewhere)  # the copy's bytes would go wherever the link points
    with pytest.raises(RaybridgeError, match="is a symbolic link: remove it and pull again"):
        ck.pull(LocalRunner(), str(cp), dest)
    partial.unlink()
    partial.mkdir(mode=0o777)
    os.chmod(partial, 0o777)  # another user could plant links in it
    with pytest.raises(RaybridgeError, match=r"is open to others \(mode 777\)"):
        ck.pull(LocalRunner(), str(cp), dest)
    os.chmod(partial, 0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (partial / "w.pt.part").symlink_to(victim)  # a link where the part file goes
    with pytest.raises(RaybridgeError, match="cannot write .*w.pt.part"):
        ck.pull(LocalRunner(), str(cp), dest)
    assert victim.read_text() == "keep me"
    (partial / "w.pt.part").unlink()
    final = ck.pull(LocalRunner(), str(cp), dest)
    assert (final / "w.pt").read_bytes() == b"weights" and (final / "shard.part1.bin").read_bytes() == b"s"


def test_a_cut_listing_is_an_error():
    with pytest.raises(RaybridgeError, match="cut short"):
        ck.fields("a\x0010\x00b\x00", 2)


def test_latest_is_the_newest_complete_checkpoint_and_an_incomplete_one_is_refused(tmp_path):
    """A pull during training: the newest folder may still be written (no marker yet). --latest takes
    the newest complete one, --name of an incomplete one is one line, and the copy is checked again."""
    from raybridge import train

    run = tmp_path / "run"
    for i, state in ((1, {"step": 10}), (2, {"step": 20})):
        (run / f"checkpoint_00000{i}").mkdir(parents=True)
        train.write_checkpoint_dir(run / f"checkpoint_00000{i}", state)
    (run / "checkpoint_000003").mkdir()
    (run / "checkpoint_000003" / "state.pt").write_bytes(b"half")  # its marker is not written yet
    cps = ck.list_checkpoints(LocalRunner(), str(run))
    assert [c.complete for c in cps] == [True, True, False]
    assert ck.choose("run", cps).name == "checkpoint_000002"
    with pytest.raises(
        RaybridgeError, match="checkpoint_000003 of run run is incomplete .*newest complete one"
    ):
        ck.choose("run", cps, "checkpoint_000003")
    with pytest.raises(RaybridgeError, match="run run has no complete checkpoint yet"):
        ck.choose("run", cps[2:])
    final = ck.pull(LocalRunner(), cps[1].path, tmp_path / "dest", complete=True)
    assert train.is_complete(final)
    # A marker that does not match the state it came with is not a complete copy: not made visible.
    (run / "checkpoint_000001" / "state.pt").write_bytes(b"changed after the marker")
    with pytest.raises(RaybridgeError, match="does not match the sha256 its completion marker names"):
        ck.pull(LocalRunner(), cps[0].path, tmp_path / "dest", complete=True)
    assert not (tmp_path / "dest" / "checkpoint_000001").exists()


class Spy(LocalRunner):
    """A LocalRunner that keeps every command it ran."""

    def __init__(self):
        super().__init__()
        self.argvs: list[list[str]] = []

    def run(self, argv, **kw):
        self.argvs.append(list(argv))
        return super().run(argv, **kw)


def test_a_complete_pull_checks_the_state_against_its_marker_not_a_second_hash(tmp_path):
    """The login node hashes every file but the state (its marker names the state's hash as saved); a
    marker that names no valid hash leaves the state to be hashed there like any file."""
    from raybridge import train

    cp = tmp_path / "run" / "checkpoint_000001"
    cp.mkdir(parents=True)
    train.write_checkpoint_dir(cp, {"step": 1, "w": b"x" * 1000})
    (cp / "extra.bin").write_bytes(b"more")
    spy = Spy()
    final = ck.pull(spy, str(cp), tmp_path / "a", complete=True)
    assert (final / "extra.bin").read_bytes() == b"more" and train.is_complete(final)
    (sums,) = [a for a in spy.argvs if a[:2] == ["sh", "-c"] and a[2] == ck.SUMS]
    assert sums[-1] == "./state.pt"
    # Not a complete pull: the state is hashed on the login node like any file.
    spy = Spy()
    ck.pull(spy, str(cp), tmp_path / "b")
    (sums,) = [a for a in spy.argvs if a[:2] == ["sh", "-c"] and a[2] == ck.SUMS]
    assert sums[-1] == ""
    # A marker that names no usable hash: hashed there too (and the copy is not a complete checkpoint).
    (cp / train.MARKER).write_text('{"sha256": "not-a-hash"}')
    spy = Spy()
    with pytest.raises(RaybridgeError, match="not a complete checkpoint"):
        ck.pull(spy, str(cp), tmp_path / "c", complete=True)
    (sums,) = [a for a in spy.argvs if a[:2] == ["sh", "-c"] and a[2] == ck.SUMS]
    assert sums[-1] == ""
    assert ck.marked_state_sum(LocalRunner(), str(cp), {"state.pt": 1, train.MARKER: 24}) is None


def test_openssl_and_sha256sum_listings_give_the_same_sums():
    """The login node's openssl (fast) or coreutils' sha256sum: the same names and sums, escaped or not."""

    class Fixed:
        def __init__(self, out):
            self.out = out

        def run(self, *args, **kwargs):
            return type("R", (), {"stdout": self.out})()

    a, b = "a" * 64, "b" * 64
    openssl = f"openssl\n\\{a} *./x\\\\y\\nz\n{b} *./plain name\n"
    coreutils = f"coreutils\n{a}  ./x\\y\nz\0{b}  ./plain name\0"
    want = {"x\\y\nz": a, "plain name": b}
    assert ck.remote_sums(Fixed(openssl), "/x") == want
    assert ck.remote_sums(Fixed(coreutils), "/x") == want
