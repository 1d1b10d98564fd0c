"""The test bed itself behaves like a real site."""

import ipaddress
import textwrap

import pytest

pytestmark = pytest.mark.cluster


def test_four_node_job_has_distinct_hosts_and_fabric_addresses(testbed, tmp_path):
    script = f"{testbed.shared}/tb-hosts.sbatch"
    out = f"{testbed.shared}/tb-hosts.out"
    with open(script, "w") as f:
        f.write(
            textwrap.dedent(f"""\
            #!/bin/bash
            #SBATCH --nodes={testbed.nodes}
            #SBATCH --output={out}
            srun bash -c 'echo "$(hostname) $(ip -4 -o addr show ib0 | awk "{{print \\$4}}") $(ip -4 -o addr show eth0 | awk "{{print \\$4}}")"'
        """)
        )
    testbed.exec("login", "sbatch", "--wait", script, check=True, timeout=120)
    rows = [line.split() for line in open(out).read().splitlines() if line.strip()]
    assert len(rows) == testbed.nodes
    hosts = {r[0] for r in rows}
    ib = {r[1].split("/")[0] for r in rows}
    eth = {r[2].split("/")[0] for r in rows}
    assert hosts == {f"n{i}" for i in range(1, testbed.nodes + 1)}
    assert len(ib) == testbed.nodes and len(eth) == testbed.nodes
    fabric = ipaddress.ip_network("10.212.0.0/24")
    assert all(ipaddress.ip_address(a) in fabric for a in ib)
    assert ib.isdisjoint(eth)


def test_each_node_has_its_own_tmp_and_sees_shared_storage(testbed):
    marker = f"{testbed.shared}/tb-shared-marker"
    open(marker, "w").write("hello")
    testbed.exec("n1", "sh", "-c", "echo n1 > /tmp/tb-private", check=True)
    assert testbed.exec("n2", "cat", "/tmp/tb-private").returncode != 0
    assert testbed.exec("n2", "cat", marker, check=True).stdout == "hello"
    assert testbed.exec("n3", "hostname", check=True).stdout.strip() == "n3"


def test_ssh_from_laptop_with_generated_key(testbed):
    r = testbed.exec(
        "laptop",
        "ssh",
        "-F",
        testbed.env["RAYBRIDGE_TESTBED_SSH_CONFIG"],
        "-o",
        "BatchMode=yes",
        "login",
        "hostname; sinfo -h -o %D",
        check=True,
        timeout=60,
    )
    name, nodes = r.stdout.split()
    assert name == "login" and int(nodes) == testbed.nodes


def test_unknown_host_key_is_rejected(testbed, tmp_path):
    empty = f"{testbed.shared}/tb-empty-known-hosts"
    open(empty, "w").close()
    r = testbed.exec(
        "laptop",
        "ssh",
        "-i",
        testbed.env["RAYBRIDGE_TESTBED_SSH_KEY"],
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={empty}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        f"{testbed.user}@10.213.0.3",
        "true",
        timeout=60,
    )
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


def test_password_login_is_refused(testbed):
    r = testbed.exec(
        "laptop",
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        f"UserKnownHostsFile={testbed.env['RAYBRIDGE_TESTBED_KNOWN_HOSTS']}",
        f"{testbed.user}@10.213.0.3",
        "true",
        timeout=60,
    )
    assert r.returncode == 255 and "Permission denied" in r.stderr


@pytest.mark.parametrize("address", ["10.211.0.11", "10.212.0.11", "10.211.0.2"])
def test_laptop_has_no_route_to_the_cluster(testbed, address):
    # No route means connect() fails at once with ENETUNREACH: nothing is sent anywhere.
    probe = f"import socket; s=socket.socket(); s.settimeout(2)\ntry: s.connect(('{address}', 22))\nexcept OSError as e: print(e.errno)"
    r = testbed.exec("laptop", "python3", "-c", probe, check=True)
    assert r.stdout.strip() == "101"  # ENETUNREACH
    routes = testbed.exec("laptop", "ip", "route", check=True).stdout
    assert "default" not in routes
