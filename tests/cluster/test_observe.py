"""What a user sees of a cluster, against the real test bed: the first contact of a new user (the job
runs raybridge's own environment; a node Python that cannot run it is one line with the fix)."""

import json
import re
import shlex
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.cluster.bed import PYTHON, RAYBRIDGE, TESTBED, as_user, assert_no_leaks

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
    return testbed.write(path, text + extra)


def test_first_contact_runs_the_clis_own_environment(testbed):
    profile = bare_profile(testbed, "first-contact")
    r = testbed.raybridge("login", "up", "--nodes", "2", "--profile", profile, timeout=300)
    job = job_id_from(r.stderr)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        log = (testbed.shared_dir / "logs" / f"raybridge-{job}.out").read_text()
        venv_python = PYTHON
        assert f"raybridge: environment ok: {venv_python}," in log, log[:3000]
    finally:
        testbed.raybridge("login", "down", job, "--profile", profile)
    testbed.wait_job_gone(job)
    assert_no_leaks(job)
    # A batch run's `python` is that environment's too (the job puts its bin folder first on PATH).
    probe = "import sys, psutil; print('driver python', sys.executable)"
    r = testbed.raybridge("login", "run", "--nodes", "2", "--profile", profile, "--", "python", "-c", probe)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"driver python {venv_python}" in r.stdout, r.stdout[-2000:]


def test_a_node_python_without_raybridges_dependencies_is_one_line(testbed):
    # Debian's Python, with raybridge (this checkout, on PYTHONPATH) but none of its dependencies. (Not
    # from the working directory: the job's own Python lines run with -P.)
    profile = bare_profile(testbed, "system-python", "python: /usr/bin/python3\n")
    text = Path(profile).read_text()
    assert "\nenv:\n" in text
    testbed.write(profile, text.replace("\nenv:\n", f"\nenv:\n  PYTHONPATH: {testbed.sources}\n", 1))
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


PROMETHEUS_CONF = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: ray
    file_sd_configs:
      - files: ["{sd_dir}/*.json"]
        refresh_interval: 1s
"""


def wait_until(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return result


def prometheus_up(testbed, job):
    """{instance: value of `up`} for the job's targets, from the real Prometheus on the login node."""
    q = urllib.parse.quote(f'up{{raybridge_job="{job}"}}')
    r = testbed.exec("login", "curl", "-s", f"http://127.0.0.1:9099/api/v1/query?query={q}")
    try:
        data = json.loads(r.stdout)["data"]["result"]
    except (ValueError, KeyError):
        return {}
    return {s["metric"]["instance"]: s["value"][1] for s in data}


def test_metrics_service_discovery_and_a_real_prometheus(testbed, crashed_nodes, tmp_path):
    sd_dir = testbed.shared_dir / "prometheus"
    work = Path(testbed.shared) / "prometheus-test"
    shutil.rmtree(work, ignore_errors=True)
    # The user's own Prometheus, reading the folder raybridge keeps its targets in.
    testbed.exec("login", "mkdir", "-p", str(sd_dir), str(work), check=True)
    testbed.write(work / "prometheus.yml", PROMETHEUS_CONF.format(sd_dir=sd_dir))
    prom = subprocess.Popen(
        as_user(
            "login",
            "prometheus",
            f"--config.file={work}/prometheus.yml",
            f"--storage.tsdb.path={work}/data",
            "--web.listen-address=127.0.0.1:9099",
        ),
        stdout=subprocess.DEVNULL,
        stderr=open(work / "prometheus.log", "w"),
    )
    r = testbed.raybridge("login", "up", "--nodes", "3", "--profile", testbed.local_profile)
    job = job_id_from(r.stderr)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        info = testbed.cluster_json(job)
        sd = sd_dir / f"{job}.json"
        groups = wait_until("the SD file", lambda: sd.exists() and json.loads(sd.read_text()))
        want = {f"{n['ip']}:{n['ports']['metrics']}" for n in info["nodes"]}
        assert {g["targets"][0] for g in groups} == want and len(want) == 3
        assert oct(sd.stat().st_mode & 0o777) == "0o644"
        # `raybridge metrics`: real values from every node.
        m = testbed.raybridge("login", "metrics", job, "--json", "--profile", testbed.local_profile)
        nodes = json.loads(m.stdout)["nodes"]
        assert len(nodes) == 3 and not any(n["error"] for n in nodes), nodes
        assert all(
            n["mem_total"] > 1 << 30 and n["cpu_percent"] is not None and n["series"] > 50 for n in nodes
        )
        text = testbed.raybridge("login", "metrics", job, "--profile", testbed.local_profile).stdout
        assert f"Prometheus targets: {sd}" in text
        # The real Prometheus scrapes every node (up == 1).
        wait_until(
            "Prometheus to scrape all nodes", lambda: prometheus_up(testbed, job) == dict.fromkeys(want, "1")
        )
        # A node's death removes its target.
        head = info["head"]["hostname"]
        batch = testbed.exec("login", "squeue", "-h", "-j", job, "-o", "%B", check=True).stdout.strip()
        victim = next(n for n in info["nodes"] if n["hostname"] not in (head, batch))
        crashed_nodes.append(victim["hostname"])
        subprocess.run([TESTBED, "crash", victim["hostname"]], check=True, capture_output=True)
        gone = f"{victim['ip']}:{victim['ports']['metrics']}"
        wait_until(
            "the dead node's target to go",
            lambda: {g["targets"][0] for g in json.loads(sd.read_text())} == want - {gone},
        )
        # Ray's Grafana dashboards are kept with the job.
        dashboards = testbed.job_dir(job) / "grafana" / "dashboards"
        assert (dashboards / "default_grafana_dashboard.json").is_file(), list(testbed.job_dir(job).iterdir())
    finally:
        testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
        prom.terminate()
        prom.wait(timeout=30)
    testbed.wait_job_gone(job)
    assert not (sd_dir / f"{job}.json").exists()


def tmux(*args):
    return subprocess.run(["tmux", "-L", "rbtest", *args], capture_output=True, text=True, timeout=30)


def test_status_watch_renders_live_in_a_terminal(testbed):
    r = testbed.raybridge("login", "up", "--nodes", "2", "--profile", testbed.local_profile)
    job = job_id_from(r.stderr)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        sub = testbed.raybridge(
            "login",
            "submit",
            "--job",
            job,
            "--profile",
            testbed.local_profile,
            "--",
            "python",
            "-c",
            "import time; time.sleep(120)",
        )
        assert sub.returncode == 0, sub.stderr
        ray_job = sub.stdout.strip()
        watch = shlex.join(
            as_user(
                "login",
                RAYBRIDGE,
                "status",
                job,
                "--watch",
                "--interval",
                "1",
                "--profile",
                testbed.local_profile,
            )
        )
        tmux("kill-server")
        assert (
            tmux(
                "new-session", "-d", "-s", "watch", "-x", "150", "-y", "30", f"{watch}; sleep 600"
            ).returncode
            == 0
        )

        def screen_with_everything():
            screen = tmux("capture-pane", "-p", "-t", "watch").stdout
            rows = re.findall(r"^(n\d+) +alive +(\d+)% +([\d.]+)/([\d.]+) ", screen, re.M)
            ok = (
                f"job {job}  Slurm RUNNING  Ray ready  2/2 nodes alive" in screen
                and len(rows) == 2
                and re.search(rf"{ray_job} +RUNNING +python -c", screen)
                and "last checkpoint: none yet" in screen
            )
            return screen if ok else None

        screen = wait_until("the live view", screen_with_everything, timeout=60)
        assert all(
            float(total) > 1
            for *_, total in re.findall(r"^(n\d+) +alive +(\d+)% +([\d.]+)/([\d.]+) ", screen, re.M)
        )
        # It follows the job to its end and says so.
        testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
        end = wait_until(
            "the view's end",
            lambda: (
                "Slurm" in (t := tmux("capture-pane", "-p", "-t", "watch").stdout)
                and re.search(rf"job {job}: Slurm (COMPLETED|CANCELLED)", t)
                and t
            ),
        )
        assert "Traceback" not in end
    finally:
        tmux("kill-server")
        testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def test_accounting_from_slurmdbd_in_run_and_status(testbed):
    burn = "import ray; ray.init(); f = ray.remote(lambda: sum(i * i for i in range(3 * 10**6))); print(sum(ray.get([f.remote() for _ in range(8)])))"
    r = testbed.raybridge(
        "login", "run", "--nodes", "2", "--profile", testbed.local_profile, "--", "python", "-c", burn
    )
    job = job_id_from(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(
        rf"job {job} used ([\d.]+) node-hours \((\d+) node-seconds\), CPU efficiency (\d+)% \(sacct\)",
        r.stderr,
    )
    assert m, r.stderr[-2000:]
    # Slurm's own accounting knows the job, with what raybridge reported.
    sacct = testbed.exec(
        "login", "sacct", "-j", job, "-n", "-P", "-X", "-o", "JobID,State,ElapsedRaw,NNodes", check=True
    )
    jid, state, elapsed, nnodes = sacct.stdout.strip().splitlines()[-1].split("|")
    assert (jid, state, nnodes) == (job, "COMPLETED", "2")
    assert int(m.group(2)) == int(elapsed) * 2 and int(elapsed) > 0
    assert 0 < int(m.group(3)) <= 100
    st = json.loads(
        testbed.raybridge("login", "status", job, "--json", "--profile", testbed.local_profile).stdout
    )
    assert st["accounting"]["node_hours"] == pytest.approx(int(elapsed) * 2 / 3600, abs=1e-6)
    text = testbed.raybridge("login", "status", job, "--profile", testbed.local_profile).stdout
    assert f"accounting {m.group(1)} node-hours" in text, text
