"""Fixtures for tests against the real test bed (scripts/testbed): a multi-node Slurm cluster,
a login node with sshd and a laptop, each in its own network namespace."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
TESTBED = str(REPO / "scripts" / "testbed")
RAYBRIDGE = str(REPO / ".venv" / "bin" / "raybridge")
PYTHON = str(REPO / ".venv" / "bin" / "python")


HTTP_PROBE = """
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + open(sys.argv[2]).read().strip())
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError as e:
    print("ERR", getattr(e, "reason", e))
"""


class Testbed:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.shared = env["RAYBRIDGE_TESTBED_SHARED"]
        self.local_profile = env["RAYBRIDGE_TESTBED_LOCAL_PROFILE"]
        self.remote_profile = env["RAYBRIDGE_TESTBED_REMOTE_PROFILE"]
        self.nodes = int(env["RAYBRIDGE_TESTBED_NODES"])

    def exec(
        self, host: str, *cmd: str, timeout: float = 300, input: str | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [TESTBED, "exec", host, "--", *cmd], capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{shlex.join(cmd)} on {host} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
            )
        return r

    def raybridge(self, host: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.exec(host, RAYBRIDGE, *args, timeout=timeout)

    def start_raybridge(self, host: str, *args: str, output: bool = True) -> subprocess.Popen[str]:
        """raybridge on host in the background (text pipes, or output discarded)."""
        pipe = subprocess.PIPE if output else subprocess.DEVNULL
        return subprocess.Popen(
            [TESTBED, "exec", host, "--", RAYBRIDGE, *args], stdout=pipe, stderr=pipe, text=True
        )

    def http(self, host: str, url: str, token_path: str | None = None) -> str:
        """GET url from host (optionally with the bearer token in token_path): status code or ERR reason."""
        args = [url] + ([token_path] if token_path else [])
        return self.exec(host, PYTHON, "-c", HTTP_PROBE, *args, check=True).stdout.strip()

    def squeue_ids(self) -> list[str]:
        return self.exec("login", "squeue", "-h", "-o", "%i", check=True).stdout.split()

    def job_dir(self, job_id: str) -> Path:
        return Path(self.shared) / "raybridge" / "jobs" / job_id

    def cluster_json(self, job_id: str) -> dict:
        return json.loads((self.job_dir(job_id) / "cluster.json").read_text())

    def wait_job_gone(self, job_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while job_id in self.squeue_ids():
            assert time.monotonic() < deadline, f"job {job_id} still in the queue"
            time.sleep(0.5)


def job_procs(job_id: str) -> list[psutil.Process]:
    """Processes anywhere on the machine that belong to this raybridge job's Ray cluster."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAYBRIDGE_JOB_ID") == job_id:
                found.append(p)
        except psutil.Error:
            continue
    return found


def job_processes(job_id: str) -> list[str]:
    """The same, as "pid:name command line" (what a failure needs to say)."""
    found = []
    for p in job_procs(job_id):
        try:
            found.append(f"{p.pid}:{p.name()} {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            continue
    return found


def ray_processes_in(namespace: str) -> list[str]:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    names = []
    for pid in pids:
        try:
            name = psutil.Process(int(pid)).name()
        except psutil.Error:
            continue
        if name in ("raylet", "gcs_server") or "ray" in name.lower():
            names.append(f"{pid}:{name}")
    return names


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    if os.geteuid() != 0:
        pytest.skip("the test bed needs root (network namespaces, Slurm daemons)")
    if subprocess.run([TESTBED, "status"], capture_output=True).returncode != 0:
        subprocess.run([TESTBED, "up"], check=True, timeout=600)
    out = subprocess.run([TESTBED, "env"], capture_output=True, text=True, check=True).stdout
    env = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    bed = Testbed(env)
    yield bed
    # A failed test must not leave jobs that block the nodes for the rest of a run.
    if subprocess.run([TESTBED, "status"], capture_output=True).returncode == 0:
        bed.exec("login", "scancel", "--user=root")
