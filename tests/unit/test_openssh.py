"""The pull's OpenSSH streams with a stand-in `ssh` (the real client is exercised on the test bed by
tests/cluster/test_access.py): the options it gets, ranges byte-exact, the master ended with the reader,
and paramiko's reader where ssh cannot connect."""

import os
import types

import psutil

from raybridge.transport import openssh

FAKE = """#!/bin/bash
# A stand-in for ssh: the master (ControlMaster=yes) makes its control socket and runs `cat`;
# a session runs its remote command here.
echo "$*" >> "$(dirname "$0")/calls"
ctl= master=
while [ $# -gt 1 ]; do
  case "$1" in
    -S) ctl=$2; shift ;;
    -o) [ "$2" = ControlMaster=yes ] && master=1; shift ;;
  esac
  shift
done
[ -n "$FAIL" ] && { echo "ssh: connect to host x port 22: Connection refused" >&2; exit 255; }
if [ -n "$master" ]; then touch "$ctl"; exec cat; fi
exec sh -c "$1"
"""


def target(**kw):
    base = dict(
        hostname="login.example",
        user="alice",
        port=2222,
        identity_files=("/home/alice/.ssh/id_ed25519",),
        known_hosts="/home/alice/.ssh/known_hosts",
        proxy_jump=None,
        label="alice@login.example:2222",
    )
    return types.SimpleNamespace(**(base | kw))


def stand_in(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(FAKE)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    return fake


def test_ranges_come_byte_exact_over_one_master_that_ends_with_the_reader(tmp_path, monkeypatch):
    fake = stand_in(tmp_path, monkeypatch)
    data = os.urandom(9 << 20)
    src = tmp_path / "it's a file.bin"
    src.write_bytes(data)
    reader = openssh.BulkRanges(target(), fallback=lambda: (_ for _ in ()).throw(AssertionError("fallback")))
    assert reader.ssh == str(fake)
    got = bytearray()
    for offset, length in ((0, 5 << 20), (5 << 20, 4 << 20), (123, 1)):
        reader.read(str(src), offset, length, lambda b: got.extend(b))
    assert bytes(got) == data + data[123:124]
    master = reader.master
    folder = reader.folder
    assert master is not None and psutil.pid_exists(master.pid)
    reader.close()
    assert master.poll() is not None and not os.path.exists(folder)
    calls = (fake.parent / "calls").read_text().splitlines()
    assert len(calls) == 4  # one master, three sessions over it
    words = calls[0].split()
    for opt in (
        "-F none",
        "-p 2222",
        "-l alice",
        "-o BatchMode=yes",
        "-o StrictHostKeyChecking=yes",
        "-o UserKnownHostsFile=/home/alice/.ssh/known_hosts",
        "-i /home/alice/.ssh/id_ed25519",
        "-o ControlMaster=yes",
    ):
        assert opt in " ".join(words), opt
    assert words[-2:] == ["login.example", "cat"]
    assert all("-o ControlMaster=no" in c for c in calls[1:])


def test_paramiko_carries_the_bytes_where_ssh_cannot_connect_or_is_not_wanted(tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch)
    src = tmp_path / "f.bin"
    src.write_bytes(b"abcdef")
    used = []

    class Paramiko:
        def read(self, path, offset, length, sink):
            used.append((path, offset, length))
            sink(src.read_bytes()[offset : offset + length])

        def close(self):
            used.append("closed")

    monkeypatch.setenv("FAIL", "1")
    reader = openssh.BulkRanges(target(), fallback=Paramiko)
    got = bytearray()
    reader.read(str(src), 1, 3, got.extend)
    reader.read(str(src), 4, 2, got.extend)  # no second try with ssh
    reader.close()
    assert bytes(got) == b"bcdef" and used == [(str(src), 1, 3), (str(src), 4, 2), "closed"]
    assert reader.folder is None and reader.master is None
    assert len((tmp_path / "bin" / "calls").read_text().splitlines()) == 1
    # ProxyJump, or the user's choice: paramiko from the start.
    assert openssh.usable(target(proxy_jump="jump.example")) is None
    monkeypatch.delenv("FAIL")
    monkeypatch.setenv(openssh.CLIENT_VAR, "paramiko")
    assert openssh.usable(target()) is None
