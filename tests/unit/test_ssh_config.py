"""SSH destination resolution: ~/.ssh/config aliases and ProxyJump chains (pure logic, no network)."""

import pytest

from raybridge.client.profile import LoginSpec
from raybridge.errors import SSHError
from raybridge.transport.ssh import jump_targets, parse_jump, resolve_target


@pytest.mark.parametrize(
    ("hop", "expected"),
    [
        ("bastion", (None, "bastion", None)),
        ("alice@bastion", ("alice", "bastion", None)),
        ("alice@bastion:2222", ("alice", "bastion", 2222)),
        ("ssh://bob@10.0.0.1:22", ("bob", "10.0.0.1", 22)),
        ("[fe80::1]:2200", (None, "fe80::1", 2200)),
    ],
)
def test_parse_jump(hop, expected):
    user, host, port = expected
    assert parse_jump(hop) == (host, user, port)


@pytest.mark.parametrize("hop", ["alice@", "host:port", "a@b:12x"])
def test_bad_jump_is_one_clear_error(hop):
    with pytest.raises(SSHError, match="cannot parse ProxyJump hop"):
        parse_jump(hop)


def test_jump_chain_resolves_each_hop_through_the_same_config(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text(
        "Host hpc\n  HostName 10.1.0.5\n  User alice\n  IdentityFile ~/.ssh/hpc_key\n  ProxyJump gw,carol@inner:2022\n"
        "Host gw\n  HostName gw.example.org\n  User gwuser\n  Port 2200\n  IdentityFile /keys/gw\n"
    )
    target = resolve_target(LoginSpec(host="hpc", ssh_config=str(cfg), known_hosts="/kh"))
    assert (target.hostname, target.user, target.proxy_jump) == ("10.1.0.5", "alice", "gw,carol@inner:2022")
    gw, inner = jump_targets(target)
    assert (gw.hostname, gw.user, gw.port, gw.identity_files) == (
        "gw.example.org",
        "gwuser",
        2200,
        ("/keys/gw",),
    )
    # A hop without its own key uses the target's; every hop checks the same known_hosts.
    assert (inner.hostname, inner.user, inner.port) == ("inner", "carol", 2022)
    assert inner.identity_files == target.identity_files
    assert gw.known_hosts == inner.known_hosts == "/kh"
    assert gw.proxy_jump is None and inner.proxy_jump is None


def test_proxyjump_none_means_direct(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("Host *\n  ProxyJump none\n")
    assert resolve_target(LoginSpec(host="x", ssh_config=str(cfg))).proxy_jump is None


def test_known_hosts_with_markers_comments_and_unknown_types(tmp_path):
    import paramiko

    from raybridge.errors import HostKeyError
    from raybridge.transport.ssh import CheckedPolicy, KnownHosts

    good, bad, new = (paramiko.RSAKey.generate(1024) for _ in range(3))
    path = tmp_path / "known_hosts"
    text = (
        "# a comment\n"
        f"login {good.get_name()} {good.get_base64()}\n"
        f"old-login {bad.get_name()} {bad.get_base64()}\n"
        f"@revoked * {bad.get_name()} {bad.get_base64()}\n"
        f"@cert-authority *.example.org {good.get_name()} {good.get_base64()}\n"
        "weird ssh-futurekey AAAAnotakey\n"
        "login2,10.0.0.3 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ\n"
    )
    path.write_text(text)
    known = KnownHosts(str(path))  # no crash on markers or keys paramiko cannot read
    assert known.keys.lookup("login")[good.get_name()] == good
    assert known.keys.lookup("old-login") is None  # its key is revoked: listed, yet not trusted
    assert known.cert_authorities == 1
    refuse = CheckedPolicy(known, str(path), accept_new=False)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts.*cert-authority"):
        refuse.missing_host_key(None, "elsewhere", new)
    accept = CheckedPolicy(known, str(path), accept_new=True)
    with pytest.raises(HostKeyError, match="marked @revoked"):
        accept.missing_host_key(None, "[old-login]:2222", bad)
    accept.missing_host_key(None, "[newhost]:2222", new)
    # accept-new appends one line and keeps everything else: comments, markers, unknown key types.
    assert path.read_text() == text + f"[newhost]:2222 {new.get_name()} {new.get_base64()}\n"
