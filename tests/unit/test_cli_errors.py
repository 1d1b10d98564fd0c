"""Bad input: one clear line on stderr, non-zero exit, no traceback, nothing submitted."""

import subprocess
import sys

import pytest


def raybridge(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raybridge", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["render", "--nodes", "0"], "nodes must be between 1"),
        (["render", "--nodes", "two"], "Invalid value for '--nodes'"),
        (["render", "--time", "1:2:3:4"], "not a Slurm time"),
        (["render", "--job-name", "x'; touch /tmp/pwned; '"], "job_name has characters"),
        (["render", "--job-name", "a\nb"], "must not contain newlines"),
        (["render", "--job-name", "$(id)"], "job_name has characters"),
        (["render", "--sbatch-arg", "--nodes=3"], "may not set '--nodes'"),
        (["render", "--sbatch-arg", "--constraint=a\n#SBATCH --mem=1"], "must not contain newlines"),
        (["render", "--profile", "does-not-exist"], "unknown profile 'does-not-exist'"),
        (["render", "--profile", "/no/such/file.yaml"], "profile file not found"),
        (["render", "--bogus"], "No such option"),
        (["down"], "name a job id, or pass --all"),
        (["submit", "12", "python", "x.py"], "use `raybridge submit --job 12 -- python x.py`"),
        (["scale", "12", "--add", "1", "--max-nodes", "4"], "--max-nodes: set with `raybridge up`/`run`"),
        (["render", "--min-nodes", "2"], "min_nodes needs max_nodes"),
        (["render", "--max-nodes", "3", "--idle-timeout", "1;x"], "Invalid value for '--idle-timeout'"),
    ],
)
def test_one_line_errors(args, message):
    r = raybridge(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("raybridge: error: ")
    assert message in lines[0]
    assert r.stdout == ""


def test_profile_with_unknown_key(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("nodes: 2\ngpus: 4\n")
    r = raybridge("render", "--profile", str(p))
    assert r.returncode == 1
    assert "unknown key 'gpus' (valid keys: " in r.stderr and "gpus_per_node" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_render_prints_a_script():
    r = raybridge("render", "--nodes", "3", "--partition", "debug")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=3" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["serve", "--time", "5", "--overlap", "5", "--", "python", "app.py"],
            "a time limit of at least --overlap + 1",
        ),
        (["serve", "--name", "a b", "--time", "60", "--", "python", "app.py"], "may hold only letters"),
        (["endpoint", "x;y"], "not a service name"),
    ],
)
def test_serve_input_errors_are_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "raybridge", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
