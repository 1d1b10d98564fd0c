"""What a user sees of a cluster, against the real test bed: the first contact of a new user (the job
runs raybridge's own environment; a node Python that cannot run it is one line with the fix)."""

import re
from pathlib import Path

import pytest

from tests.cluster.bed import REPO, assert_no_leaks

pytestmark = pytest.mark.cluster


def job_id_from(stderr: str) -> str:
    m = re.search(r"submitted job (\d+)", stderr)
    assert m, stderr
    return m.group(1)


def bare_profile(testbed, name: str, extra: str = "") -> str:
    """A profile as a new user writes it: no `setup`, no `python` (raybridge runs from its venv)."""
    text = Path(testbed.local_profile).read_text()
    text = re.sub(r"setup:\n(  - .*\n)+", "", text)
    assert "setup" not in text and "activate" not in text
    path = Path(testbed.shared) / f"{name}.yaml"
    path.write_text(text + extra)
    return str(path)


def test_first_contact_runs_the_clis_own_environment(testbed):
    profile = bare_profile(testbed, "first-contact")
    r = testbed.raybridge("login", "up", "--nodes", "2", "--profile", profile, timeout=300)
    job = job_id_from(r.stderr)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        log = (Path(testbed.shared) / "raybridge" / "logs" / f"raybridge-{job}.out").read_text()
        venv_python = str(REPO / ".venv" / "bin" / "python")
        assert f"raybridge: environment ok: {venv_python}," in log, log[:3000]
    finally:
        testbed.raybridge("login", "down", job, "--profile", profile)
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def test_a_node_python_without_raybridges_dependencies_is_one_line(testbed):
    profile = bare_profile(testbed, "system-python", "python: /usr/bin/python3\n")
    r = testbed.raybridge("login", "up", "--nodes", "2", "--profile", profile, timeout=300)
    job = job_id_from(r.stderr)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr, r.stderr
    assert re.search(
        r"raybridge: error: cluster \d+ failed: n\d+: /usr/bin/python3 cannot import \w+", last
    ), last
    assert "set `python:` in the profile" in last, last
    testbed.wait_job_gone(job)
    assert_no_leaks(job)
