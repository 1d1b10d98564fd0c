"""The nodes' environment check: one line naming what is wrong, found again by the CLI."""

import subprocess
import sys
from pathlib import Path

from raybridge import envcheck

REPO = Path(__file__).resolve().parents[2]


def test_the_same_versions_pass_and_others_are_named():
    mine = envcheck.encode(envcheck.versions())
    assert envcheck.problem(mine) is None
    other = mine.replace("ray=", "ray=1.") + " torch=9.9"
    why = envcheck.problem(other)
    assert why and "runs ray " in why and "(login node: 1." in why and "torch none (login node: 9.9)" in why
    assert "set `python:` in the profile" in why
    assert envcheck.problem(envcheck.encode(envcheck.versions(full=False))) is None


def test_a_python_without_the_dependencies_says_so_in_one_line(tmp_path):
    # A bare venv with no packages: raybridge itself on its path, none of its dependencies.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True)
    r = subprocess.run(
        [str(tmp_path / "v" / "bin" / "python"), "-m", "raybridge.envcheck"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 3 and r.stderr == ""
    (line,) = r.stdout.splitlines()
    assert line.startswith(envcheck.ERROR_MARK) and "cannot import psutil" in line
    assert envcheck.find_error("noise\n" + r.stdout) == line[len(envcheck.ERROR_MARK) :]


def test_the_cli_finds_pythons_and_the_shells_own_lines():
    no_pkg = "/usr/bin/python3: Error while finding module specification for 'raybridge.envcheck' (...)"
    assert "cannot import raybridge" in (envcheck.find_error(no_pkg) or "")
    missing = (
        "/var/spool/slurmd/job1/slurm_script: line 40: /home/u/venv/bin/python: No such file or directory"
    )
    assert "is not there on the node" in (envcheck.find_error(missing, "/home/u/venv/bin/python") or "")
    assert envcheck.find_error("all fine\nTraceback (most recent call last):", "python3") is None
