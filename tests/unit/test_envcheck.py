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


def test_a_folder_named_raybridge_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """A job started from home has ~/raybridge (the default shared folder) in its working directory; the
    script's own Python lines must import the installed raybridge, not that folder (an editable install
    is found after the working directory, so a plain `python -m` would take the folder for the package)."""
    from raybridge.client.profile import build_spec
    from raybridge.client.render import render

    (tmp_path / "raybridge" / "jobs").mkdir(parents=True)
    line = next(x for x in render(build_spec({"shared_dir": "/s"})).splitlines() if "raybridge.envcheck" in x)
    argv = [sys.executable, *line.split()[1:]]  # the script's own line, with this interpreter
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONPATH", "RAYBRIDGE_VERSIONS")}
    r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "raybridge: environment ok" in r.stdout, r.stdout + r.stderr


def test_a_python_older_than_311_is_one_line():
    out = (
        "Unknown option: -P\nusage: /usr/bin/python3.9 [option] ... [-c cmd | -m mod | file | -] [arg] ...\n"
    )
    why = envcheck.find_error(out, "/usr/bin/python3.9")
    assert why and why.startswith("the job's Python /usr/bin/python3.9 is older than 3.11")
