"""Fixtures for tests against the real test bed (helpers in bed.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.cluster.bed import TESTBED, USER, USERS, Testbed, all_job_ids, assert_no_leaks, user_processes


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
    bed = bed_for(USER)
    clear_queue(bed)  # a killed run may have left jobs that hold the nodes
    yield bed
    # A failed test must not leave jobs that block the nodes for the rest of a run.
    if subprocess.run([TESTBED, "status"], capture_output=True).returncode == 0:
        bed.admin("login", "sh", "-c", "squeue -h -o %i | xargs -r scancel --")


def clear_queue(bed: Testbed, timeout: float = 120) -> None:
    """Cancel every job in the queue and wait until it is empty (their agents stop their Ray)."""
    bed.admin("login", "sh", "-c", "squeue -h -o %i | xargs -r scancel --")
    deadline = time.monotonic() + timeout
    while bed.squeue_ids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs left from an earlier run did not end: {bed.squeue_ids()}")
        time.sleep(1)
    for user in USERS:  # and what its users still ran (CLIs, tunnels, endpoints): the PID space is shared
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)


def bed_for(user: str) -> Testbed:
    """The test bed as `user` sees it (that user's profiles, home and shared folder)."""
    out = subprocess.run([TESTBED, "env", "--user", user], capture_output=True, text=True, check=True).stdout
    env = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip('"')
    return Testbed(env)


@pytest.fixture(scope="session")
def bob(testbed: Testbed) -> Testbed:
    """A colleague of the test's user: same project group, same nodes, his own account."""
    return bed_for("bob")


@pytest.fixture(scope="session")
def carol(testbed: Testbed) -> Testbed:
    """A user of the site outside the project group."""
    return bed_for("carol")


@pytest.fixture
def crashed_nodes() -> Iterator[list[str]]:
    """Nodes a test crashed come back (slurmd started, node resumed) when it ends, whatever happened."""
    nodes: list[str] = []
    yield nodes
    for node in nodes:
        subprocess.run([TESTBED, "revive", node], capture_output=True)


@pytest.fixture(autouse=True)
def no_job_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every Slurm job a test caused (member jobs, requeues and autoscaled nodes included) has ended
    when the test ends, and nothing of it runs on any node — whether or not the test checked."""
    if "testbed" not in request.fixturenames:
        yield
        return
    bed: Testbed = request.getfixturevalue("testbed")
    # The bed's own lifecycle tests take it down and up: no jobs to follow there.
    bed_up = lambda: subprocess.run([TESTBED, "status"], capture_output=True).returncode == 0  # noqa: E731
    if not bed_up():
        yield
        return
    known = set(all_job_ids(bed))
    yield
    if not bed_up():
        return
    for job in [j for j in all_job_ids(bed) if j not in known]:
        bed.wait_job_gone(str(job), timeout=120)
        assert_no_leaks(str(job), timeout=30)


@pytest.fixture(scope="module", autouse=True)
def no_user_process_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each module (its tunnels and clusters torn down), no process of the bed's users is left on
    any host: laptop tunnels, CLIs in the background, drivers, Ray."""
    yield
    if os.geteuid() != 0 or subprocess.run([TESTBED, "status"], capture_output=True).returncode != 0:
        return
    deadline = time.monotonic() + 30
    while left := user_processes():
        assert time.monotonic() < deadline, (
            f"processes of the bed's users left after {request.module.__name__}: {left}"
        )
        time.sleep(0.5)
