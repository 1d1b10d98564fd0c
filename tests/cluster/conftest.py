"""Fixtures for tests against the real test bed (helpers in bed.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.cluster.bed import TESTBED, USER, Testbed


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    if os.geteuid() != 0:
        why = "the test bed needs root (network namespaces, Slurm daemons)"
        # In CI a cluster test that cannot run is a failure, not a pass by omission.
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    if subprocess.run([TESTBED, "status"], capture_output=True).returncode != 0:
        subprocess.run([TESTBED, "up"], check=True, timeout=900)
    out = subprocess.run([TESTBED, "env", "--user", USER], capture_output=True, text=True, check=True).stdout
    env = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip('"')
    bed = Testbed(env)
    yield bed
    # A failed test must not leave jobs that block the nodes for the rest of a run.
    if subprocess.run([TESTBED, "status"], capture_output=True).returncode == 0:
        bed.admin("login", "sh", "-c", "squeue -h -o %i | xargs -r scancel --")


@pytest.fixture
def crashed_nodes() -> Iterator[list[str]]:
    """Nodes a test crashed come back (slurmd started, node resumed) when it ends, whatever happened."""
    nodes: list[str] = []
    yield nodes
    for node in nodes:
        subprocess.run([TESTBED, "revive", node], capture_output=True)
