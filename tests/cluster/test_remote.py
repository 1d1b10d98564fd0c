"""Remote mode: the laptop reaches Slurm only through the login node's sshd."""

import json
import re

import pytest

from tests.cluster.bed import PYTHON, assert_no_leaks

pytestmark = pytest.mark.cluster


def test_remote_up_status_down(testbed):
    r = testbed.raybridge("laptop", "up", "--nodes", "2", "--profile", testbed.remote_profile)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        assert f"on {testbed.user}@10.213.0.3" in r.stderr
        st = testbed.raybridge("laptop", "status", job, "--json", "--profile", testbed.remote_profile)
        assert st.returncode == 0, st.stderr
        rec = json.loads(st.stdout)
        assert rec["ray_state"] == "ready" and rec["alive_nodes"] == 2
        assert len({n["ip"] for n in rec["nodes"]}) == 2
    finally:
        d = testbed.raybridge("laptop", "down", job, "--profile", testbed.remote_profile)
    assert d.returncode == 0, d.stderr
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def test_remote_run_exit_code(testbed):
    r = testbed.raybridge(
        "laptop",
        "run",
        "--nodes",
        "2",
        "--profile",
        testbed.remote_profile,
        "--",
        "python",
        "-c",
        "import sys; print('remote driver'); sys.exit(5)",
    )
    assert r.returncode == 5, r.stderr + r.stdout
    assert "remote driver" in r.stdout.splitlines()
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def one_line_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raybridge: error: "), r.stderr
    return lines[0]


def profile_variant(testbed, name, **login):
    text = open(testbed.remote_profile).read()
    for key, value in login.items():
        text = re.sub(rf"(?m)^  {key}: .*$", f"  {key}: {value}", text)
    path = f"{testbed.shared}/{name}.yaml"
    return testbed.write(path, text)


def test_unreachable_login_host(testbed):
    before = testbed.squeue_ids()
    r = testbed.raybridge(
        "laptop", "up", "--profile", testbed.remote_profile, "--login", "root@10.213.0.77", timeout=120
    )
    assert "cannot reach login host root@10.213.0.77" in one_line_error(r)
    assert testbed.squeue_ids() == before


def test_unknown_host_key_is_refused_and_accept_new_records_it(testbed):
    kh = f"{testbed.shared}/remote-known-hosts"
    testbed.write(kh, "")
    path = profile_variant(testbed, "remote-unknown-key", known_hosts=kh)
    r = testbed.raybridge("laptop", "status", "--profile", path)
    assert "is not in" in one_line_error(r) and "refusing to connect" in r.stderr
    # A file with what OpenSSH users keep in it: comments, a certificate authority line.
    before = (
        "# site keys\n@cert-authority *.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFrZWtleWZha2Vr\n"
    )
    testbed.write(kh, before)
    r = testbed.raybridge("laptop", "status", "--profile", path)
    assert "is not in" in one_line_error(r) and "@cert-authority, are not supported" in r.stderr
    ok = testbed.raybridge("laptop", "status", "--profile", path, "--accept-new-host-key")
    assert ok.returncode == 0, ok.stderr
    text = open(kh).read()
    assert text.startswith(before) and len(text.splitlines()) == 3  # one line appended, nothing lost
    assert "10.213.0.3" in text.splitlines()[2]
    # The same key, now revoked: refused even though it is also listed as the host's key.
    name, kind, blob = text.splitlines()[2].split()
    open(kh, "a").write(f"@revoked * {kind} {blob}\n")
    r = testbed.raybridge("laptop", "status", "--profile", path, "--accept-new-host-key")
    assert "is marked @revoked" in one_line_error(r)


def test_changed_host_key_is_refused(testbed):
    kh = f"{testbed.shared}/remote-wrong-known-hosts"
    # A syntactically valid ed25519 key that is not the login node's.
    testbed.write(
        kh, "10.213.0.3 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFrZWtleWZha2VrZXlmYWtla2V5ZmFrZWtleWZh\n"
    )
    path = profile_variant(testbed, "remote-wrong-key", known_hosts=kh)
    r = testbed.raybridge("laptop", "status", "--profile", path, "--accept-new-host-key")
    assert "does not match" in one_line_error(r)


def test_wrong_client_key(testbed):
    key = f"{testbed.shared}/other_id"
    testbed.exec("laptop", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key, check=True, input="y\n")
    path = profile_variant(testbed, "remote-wrong-client-key", identity_file=key)
    r = testbed.raybridge("laptop", "status", "--profile", path)
    assert f"authentication to {testbed.user}@10.213.0.3 failed" in one_line_error(r)


def test_ssh_config_alias_is_honoured(testbed):
    # `login` exists only as a Host alias in the test bed's ssh_config (HostName, User, IdentityFile).
    path = f"{testbed.shared}/remote-alias.yaml"
    text = open(testbed.remote_profile).read().split("login:")[0]
    testbed.write(
        path,
        text + "login:\n  host: login\n"
        f"  ssh_config: {testbed.env['RAYBRIDGE_TESTBED_SSH_CONFIG']}\n"
        f"  known_hosts: {testbed.env['RAYBRIDGE_TESTBED_KNOWN_HOSTS']}\n",
    )
    r = testbed.raybridge("laptop", "status", "--profile", path)
    assert r.returncode == 0, r.stderr


def test_proxy_jump_reaches_a_login_node_the_laptop_cannot(testbed):
    # The login node's sshd also listens on its management address 10.211.0.3, which only the cluster
    # can reach: from the laptop it takes a jump through the public address 10.213.0.3.
    key_line = open(testbed.env["RAYBRIDGE_TESTBED_KNOWN_HOSTS"]).read().split()
    kh = f"{testbed.shared}/jump-known-hosts"
    testbed.write(kh, f"10.211.0.3,10.213.0.3 {key_line[1]} {key_line[2]}\n")
    base = open(testbed.remote_profile).read().split("login:")[0]
    identity = re.search(r"(?m)^  identity_file: (.*)$", open(testbed.remote_profile).read()).group(1)

    def profile(name, login):
        path = f"{testbed.shared}/{name}.yaml"
        testbed.write(path, base + "login:\n" + "".join(f"  {k}: {v}\n" for k, v in login.items()))
        return path

    direct = {"host": "10.211.0.3", "user": testbed.user, "identity_file": identity, "known_hosts": kh}
    r = testbed.raybridge("laptop", "status", "--json", "--profile", profile("jump-direct", direct))
    assert f"cannot reach login host {testbed.user}@10.211.0.3" in one_line_error(r)

    sshd_log = f"{testbed.env['RAYBRIDGE_TESTBED_ROOT']}/state/log/sshd.log"
    seen = len(open(sshd_log).read().splitlines())
    jumped = dict(direct, proxy_jump=f"{testbed.user}@10.213.0.3")
    r = testbed.raybridge("laptop", "status", "--json", "--profile", profile("jump-option", jumped))
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)
    new = open(sshd_log).read().splitlines()[seen:]
    # First hop from the laptop, then the real session arriving over the jump host's forwarded channel.
    assert any(f"Accepted publickey for {testbed.user} from 10.213.0.100" in line for line in new), new
    assert any(f"Accepted publickey for {testbed.user} from 10.211.0.3" in line for line in new), new

    # The same through ~/.ssh/config: an alias whose ProxyJump names another alias.
    cfg = f"{testbed.shared}/jump-ssh-config"
    testbed.write(
        cfg,
        f"Host hpc\n  HostName 10.211.0.3\n  User {testbed.user}\n  IdentityFile {identity}\n  ProxyJump bastion\n"
        f"Host bastion\n  HostName 10.213.0.3\n  User {testbed.user}\n",
    )
    r = testbed.raybridge(
        "laptop",
        "status",
        "--json",
        "--profile",
        profile("jump-config", {"host": "hpc", "ssh_config": cfg, "known_hosts": kh}),
    )
    assert r.returncode == 0, r.stderr

    # A jump host that cannot reach the destination: one clear line.
    bad = dict(direct, host="10.211.0.99")
    r = testbed.raybridge(
        "laptop",
        "status",
        "--profile",
        profile("jump-bad", dict(bad, proxy_jump=f"{testbed.user}@10.213.0.3")),
    )
    u = testbed.user
    assert f"jump host {u}@10.213.0.3 cannot reach {u}@10.211.0.99" in one_line_error(r)


def test_the_ssh_connection_negotiates_the_fast_cipher_and_big_packets(testbed):
    """What bench-tunnel's throughput rests on, against the real sshd: AES-GCM is chosen and the
    server sends packets larger than paramiko's default 32 KiB."""
    probe = (
        "import sys; from raybridge.client.profile import load_spec; from raybridge.transport.ssh import connect, resolve_target\n"
        "c = connect(resolve_target(load_spec(sys.argv[1]).login)); t = c.get_transport()\n"
        "ch = t.open_channel('direct-tcpip', ('10.213.0.3', 22), ('127.0.0.1', 0))\n"
        "print(t.remote_cipher, t.local_cipher, ch.in_max_packet_size, ch.in_window_size)"
    )
    r = testbed.exec("laptop", PYTHON, "-c", probe, testbed.remote_profile)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "aes128-gcm@openssh.com",
        "aes128-gcm@openssh.com",
        str(128 << 10),
        str(4 << 20),
    ]
