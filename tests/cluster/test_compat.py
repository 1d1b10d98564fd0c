"""raybridge on the oldest Ray it supports and on the newest Ray release there is: the launcher's unit
tests and one real 2-node cluster (up, status, a Ray task on both nodes, down, nothing left), with the
fast in-agent start where it was verified and a clean fallback to `ray start` elsewhere.

Side venvs come from scripts/compat-venv (cached; the newest reuses the main .venv when it is current).
RAYBRIDGE_COMPAT_RAY=2.55.1,... runs other releases (e.g. to verify one for the fast start)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.cluster.bed import PYTHON, REPO, ROOT, VENV, assert_no_leaks

pytestmark = pytest.mark.cluster

TASKS = """
import socket, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
@ray.remote(num_cpus=1)
def where():
    return socket.gethostname()
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
print("hosts", sorted(ray.get(pinned)))
"""
# Warm workers on this Ray (agent/warm.py): the head reads the actor table, every node's agent asks its
# raylet for an idle process with a training worker's runtime env, and Ray gives the next such actor
# that process (started before the actor was asked for).
WARM = """
import time, psutil, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
@ray.remote(num_cpus=0, runtime_env={"env_vars": {"RB_COMPAT": "1"}})
class RayTrainWorker:
    def started(self):
        return psutil.Process().create_time()
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
def group():
    return [RayTrainWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
first = group()
ray.get([a.started.remote() for a in first])
time.sleep(12)
for a in first:
    ray.kill(a)
asked = time.time()
print("warm", [s < asked for s in ray.get([a.started.remote() for a in group()])])
"""


@pytest.fixture(scope="module", params=os.environ.get("RAYBRIDGE_COMPAT_RAY", "oldest,newest").split(","))
def venv(request):
    # Venvs the test bed's users can run: Debian's python3, on the bed's software folder.
    env = os.environ | {"PYTHON": "/usr/bin/python3", "RAYBRIDGE_COMPAT_CACHE": str(ROOT / "opt" / "compat")}
    r = subprocess.run(
        [str(REPO / "scripts" / "compat-venv"), request.param],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    path = tests = Path(r.stdout.strip().splitlines()[-1])
    if path == REPO / ".venv":  # the checkout's Ray: the users' venv has the same versions
        path = VENV
    version = subprocess.run(
        [str(path / "bin" / "python"), "-c", "import ray; print(ray.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    fast = subprocess.run(
        [
            str(path / "bin" / "python"),
            "-c",
            "from raybridge.agent import ray_internals as r; print(r.support())",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",  # the installed raybridge of that venv (editable: this checkout)
    ).stdout.strip()
    return {"path": path, "tests": tests, "version": version, "support": fast, "which": request.param}


def test_launcher_unit_tests_pass(venv):
    r = subprocess.run(
        [
            str(venv["tests"] / "bin" / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/unit/test_ray_internals.py",
            "tests/unit/test_contract.py",
            "tests/unit/test_autoscale.py",  # the autoscaler config and provider on this Ray
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == 0, f"Ray {venv['version']}:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"


def test_two_node_cluster(testbed, venv):
    py, rb = venv["path"] / "bin" / "python", venv["path"] / "bin" / "raybridge"
    profile = Path(testbed.shared) / f"compat-{venv['which']}.yaml"
    text = Path(testbed.local_profile).read_text()
    text = re.sub(r"source \S+/bin/activate", f"source {venv['path']}/bin/activate", text)
    testbed.write(profile, text + f"python: {py}\n")
    up = testbed.exec(
        "login", str(rb), "up", "--nodes", "2", "--profile", str(profile), "--json", timeout=300
    )
    job = re.search(r"submitted job (\d+)", up.stderr).group(1)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        st = testbed.exec("login", str(rb), "status", job, "--json", "--profile", str(profile), check=True)
        rec = json.loads(st.stdout)
        assert rec["alive_nodes"] == 2
        started = {n["ray_started_by"] for n in rec["nodes"]}
        if "fast=True" in venv["support"]:
            assert started == {"agent"}, rec["nodes"]
        else:  # a clean fallback, with the reason on record
            assert started == {"ray start"}, rec["nodes"]
            assert all(venv["version"] in (n["ray_start_reason"] or "") for n in rec["nodes"]), rec["nodes"]
        env = [
            "env",
            f"RAY_ADDRESS={rec['address']}",
            "RAY_AUTH_MODE=token",
            f"RAY_AUTH_TOKEN_PATH={rec['token_path']}",
        ]
        head = rec["nodes"][0]["hostname"]  # a driver runs on a node of the cluster (its raylet)
        tasks = testbed.exec(head, *env, str(py), "-c", TASKS, timeout=180)
        hosts = sorted(n["hostname"] for n in rec["nodes"])
        assert f"hosts {hosts}" in tasks.stdout.splitlines(), tasks.stdout[-2000:] + tasks.stderr[-2000:]
        warm = testbed.exec(head, *env, str(py), "-c", WARM, timeout=180)
        assert "warm [True, True]" in warm.stdout.splitlines(), warm.stdout[-2000:] + warm.stderr[-2000:]
    finally:
        down = testbed.exec("login", str(rb), "down", job, "--profile", str(profile))
    assert down.returncode == 0, down.stderr
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def test_a_job_python_with_other_versions_is_refused_in_one_line(testbed, venv):
    """raybridge (this checkout's venv) submits; the profile points the job at another venv's Python."""
    ours = subprocess.run(
        [PYTHON, "-c", "import ray; print(ray.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if venv["version"] == ours:
        pytest.skip(f"this venv runs raybridge's own Ray {ours}")
    profile = Path(testbed.shared) / f"mismatch-{venv['which']}.yaml"
    testbed.write(profile, Path(testbed.local_profile).read_text() + f"python: {venv['path']}/bin/python\n")
    r = testbed.raybridge("login", "up", "--nodes", "1", "--profile", str(profile), timeout=300)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert f"runs ray {venv['version']} (login node: {ours})" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    testbed.wait_job_gone(job)
    assert_no_leaks(job)
