"""A tunnel outlives a requeue: the job restarts on other nodes with a new token, the tunnel follows.

In its own module: it drains a node, so no other cluster may be holding the rest of the test bed."""

import re
import time
from pathlib import Path

import pytest

from tests.cluster.bed import assert_no_leaks

pytestmark = pytest.mark.cluster
PORT = "18266"


def wait_for(what, check, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def test_tunnel_follows_a_requeued_job_to_its_new_head(testbed):
    prof = ("--profile", testbed.remote_profile)
    r = testbed.raybridge("laptop", "up", "--nodes", "2", "--requeue", *prof)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    drained = None
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        t = testbed.raybridge("laptop", "tunnel", job, "--background", "--local-port", PORT, *prof)
        assert t.returncode == 0, t.stderr + t.stdout
        token = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", t.stdout).group(1)
        url = f"http://127.0.0.1:{PORT}/api/version"
        assert testbed.http("laptop", url, token) == "200"
        before = testbed.cluster_json(job)
        old_token = Path(token).read_text()

        # The head's node goes away (drained) and the job is requeued: it must restart elsewhere.
        drained = before["head"]["hostname"]
        testbed.exec(
            "login",
            "scontrol",
            "update",
            f"nodename={drained}",
            "state=drain",
            "reason=test",
            check=True,
            user="root",
        )
        testbed.exec("login", "scontrol", "requeue", job, check=True)
        # Slurm holds a requeued job for a while (BeginTime); release it now.
        wait_for("the requeued job to be pending", lambda: job_state(testbed, job) == "PENDING", 60)
        testbed.exec("login", "scontrol", "update", f"jobid={job}", "starttime=now", check=True)

        def restarted():
            info = testbed.cluster_json(job)
            return (
                info if info.get("state") == "ready" and info["started_at"] > before["started_at"] else None
            )

        after = wait_for("the requeued cluster to be ready", restarted, 180)
        assert after["head"]["hostname"] != drained
        # The same tunnel and the same token file, now for the new head and the new token.
        wait_for("the tunnel to reach the new head", lambda: testbed.http("laptop", url, token) == "200", 30)
        assert Path(token).read_text() != old_token
        log = (testbed.home / ".cache" / "raybridge" / "tunnels" / f"{job}.log").read_text()
        assert f"the head moved to {after['head']['ip']}" in log, log
        assert "new auth token" in log, log
    finally:
        if drained:
            testbed.admin("login", "scontrol", "update", f"nodename={drained}", "state=resume")
        testbed.raybridge("laptop", "tunnel", "--stop", job)
        testbed.raybridge("laptop", "down", job, *prof)
        testbed.wait_job_gone(job)
    assert_no_leaks(job)


def job_state(testbed, job: str) -> str:
    return testbed.exec("login", "squeue", "-h", "-j", job, "-o", "%T").stdout.strip()
