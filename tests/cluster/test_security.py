"""Two users' clusters on the same nodes: separate ports, and neither gets in without its token."""

import json
import re

import pytest

from tests.cluster.bed import PYTHON, assert_no_leaks

pytestmark = pytest.mark.cluster

GCS_PROBE = """
import os, sys
from ray._raylet import GcsClient
try:
    nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)
    print("ALLOWED", len(nodes))
except Exception as e:
    print("REFUSED", type(e).__name__, str(e).splitlines()[0][:120])
"""
REFUSED = "REFUSED AuthenticationError RPC error: InvalidAuthToken"


def probe_gcs(testbed, address, token_path):
    env = ["env", "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={token_path}"]
    return testbed.exec("login", *env, PYTHON, "-c", GCS_PROBE, address, timeout=120).stdout.strip()


def http(testbed, url, token_path=None):
    return int(testbed.http("login", url + "/api/version", token_path))


def test_two_clusters_share_nodes_without_colliding_or_trusting_each_other(testbed):
    args = (
        "up",
        "--nodes",
        "2",
        "--partition",
        "shared",
        "--profile",
        testbed.local_profile,
        "--json",
        "--sbatch-arg=--nodelist=n1,n2",
    )
    procs = [testbed.start_raybridge("login", *args) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    jobs = [re.search(r"submitted job (\d+)", err).group(1) for _, err in results]
    try:
        for p, (out, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err + out
        a, b = (json.loads(out) for out, _ in results)
        # They really share nodes, yet every port differs.
        shared_hosts = {n["hostname"] for n in a["nodes"]} & {n["hostname"] for n in b["nodes"]}
        assert shared_hosts, "the shared partition should have put both clusters on the same nodes"
        ports_a = set(testbed.cluster_json(a["job_id"])["ports"].values())
        ports_b = set(testbed.cluster_json(b["job_id"])["ports"].values())
        assert ports_a.isdisjoint(ports_b)
        assert a["alive_nodes"] == 2 and b["alive_nodes"] == 2
        token_a, token_b = a["token_path"], b["token_path"]
        assert open(token_a).read() != open(token_b).read()
        # GCS: each cluster answers its own token (both nodes listed) and refuses the other's with
        # Ray's authentication error, nothing else (a timeout or a wrong address is not a refusal).
        assert probe_gcs(testbed, a["address"], token_a) == "ALLOWED 2"
        assert probe_gcs(testbed, b["address"], token_b) == "ALLOWED 2"
        for address, wrong in ((a["address"], token_b), (b["address"], token_a)):
            assert probe_gcs(testbed, address, wrong).startswith(REFUSED), wrong
        # Dashboard / Jobs API: no token → 401, wrong token → 401/403, right token → 200.
        assert http(testbed, a["dashboard_url"]) in (401, 403)
        assert http(testbed, a["dashboard_url"], token_b) in (401, 403)
        assert http(testbed, a["dashboard_url"], token_a) == 200
        assert http(testbed, b["dashboard_url"], token_b) == 200
    finally:
        for job in jobs:
            testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
    for job in jobs:
        testbed.wait_job_gone(job)
        assert_no_leaks(job)
