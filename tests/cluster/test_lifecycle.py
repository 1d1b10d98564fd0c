"""up / status / down / run / render against the real test bed, on the login node (local mode)."""

import gzip
import ipaddress
import json
import re
import stat
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.bed import assert_no_leaks, job_processes, job_procs

pytestmark = pytest.mark.cluster
FABRIC = ipaddress.ip_network("10.212.0.0/24")


def late_processes(job_id: str) -> dict[str, int]:
    """Log monitors and autoscaler monitors of this job, by script name."""
    counts: dict[str, int] = {}
    for p in job_procs(job_id):
        try:
            cmdline = p.cmdline()
        except psutil.Error:
            continue
        script = next((Path(a).name for a in cmdline if a.endswith("monitor.py")), None)
        if script:
            counts[script] = counts.get(script, 0) + 1
    return counts


def job_id_from(stderr: str) -> str:
    m = re.search(r"submitted job (\d+)", stderr)
    assert m, stderr
    return m.group(1)


def test_up_status_down_three_nodes(testbed):
    rendered = testbed.raybridge("login", "render", "--nodes", "3", "--profile", testbed.local_profile)
    assert rendered.returncode == 0, rendered.stderr
    r = testbed.raybridge("login", "up", "--nodes", "3", "--profile", testbed.local_profile)
    job = job_id_from(r.stderr)
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        # `render` is the exact dry run: the script Slurm runs is byte for byte what it printed (sbatch got
        # the text itself, not a path someone could swap), and it said how up submits it.
        held = testbed.exec("login", "scontrol", "write", "batch_script", job, "-", check=True).stdout
        assert held == rendered.stdout
        logs = f"{testbed.shared_dir}/logs"
        assert f"sbatch --output={logs}/%x-%j.out < {testbed.shared_dir}/scripts/" in rendered.stderr
        assert re.search(r"job \d+: running", r.stderr)  # live progress was shown
        assert "all 3 nodes joined, cluster ready" in r.stderr
        assert f"Ray cluster ready: job {job}, 3 nodes" in r.stdout
        st = testbed.raybridge("login", "status", job, "--json", "--profile", testbed.local_profile)
        assert st.returncode == 0, st.stderr
        rec = json.loads(st.stdout)
        assert rec["slurm_state"] == "RUNNING" and rec["ray_state"] == "ready"
        assert rec["alive_nodes"] == 3
        ips = {n["ip"] for n in rec["nodes"]}
        hosts = {n["hostname"] for n in rec["nodes"]}
        assert len(ips) == 3 and len(hosts) == 3
        assert all(ipaddress.ip_address(ip) in FABRIC for ip in ips)  # ib0, not eth0
        assert all(n["interface"] == "ib0" for n in rec["nodes"])
        # The head runs on the second node (the first runs the batch script), on its fabric address.
        head = testbed.cluster_json(job)["head"]
        assert rec["address"] == f"{head['ip']}:{head['ports']['gcs']}" and head["ip"] in ips
        assert head["rank"] == 1 and head["generation"] == 0
        # The token and the cluster record are private to the user.
        info = testbed.cluster_json(job)
        token = testbed.job_dir(job) / "token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert stat.S_IMODE((testbed.job_dir(job) / "cluster.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(testbed.job_dir(job).stat().st_mode) == 0o700
        assert info["token_path"] == str(token)
        for phase in ("submitted_at", "started_at", "head_up_at", "nodes_alive_at", "ready_at"):
            assert info[phase] > 0
        assert info["submitted_at"] <= info["started_at"] <= info["head_up_at"] <= info["ready_at"]
        assert info["head_up_at"] <= info["nodes_alive_at"] <= info["ready_at"]
        assert job_processes(job), "Ray processes of the job should carry the job marker"
        # Ray was started by the agent's launcher, not the slower `ray start` fallback, and the
        # processes it starts late are there: a log monitor per node, the head's monitor.
        (output,) = (testbed.shared_dir / "logs").glob(f"*-{job}.out")
        text = output.read_text()
        assert "using the `ray start` command" not in text
        assert "8.8.8.8" not in text  # Ray's "no route to the internet" warning stays out of the job log
        deadline = time.monotonic() + 15
        while (late := late_processes(job)) != {"log_monitor.py": 3, "monitor.py": 1}:
            assert time.monotonic() < deadline, late
            time.sleep(0.5)
        listing = testbed.raybridge("login", "status", "--profile", testbed.local_profile)
        assert f"job {job} (raybridge): Slurm RUNNING, Ray ready, 3/3 nodes alive" in listing.stdout
        # Ray's own logs of a node, read on the node while the job runs.
        worker = rec["nodes"][1]["hostname"]
        live = testbed.raybridge(
            "login", "logs", job, "--node", worker, "--ray", "raylet", "--profile", testbed.local_profile
        )
        assert live.returncode == 0, live.stderr
        assert (
            f"==> {worker}/raylet.out (on {worker}, live)" in live.stderr
            and "(raylet) main.cc" in live.stdout
        )
    finally:
        d = testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
    assert d.returncode == 0, d.stderr
    assert f"job {job}: stopped" in d.stderr
    # ... and kept on shared storage after the job: the same log, from the job folder, private.
    kept = testbed.raybridge(
        "login", "logs", job, "--node", worker, "--ray", "raylet", "--profile", testbed.local_profile
    )
    assert kept.returncode == 0, kept.stderr
    assert f"==> {worker}/raylet.out (kept in " in kept.stderr and "(raylet) main.cc" in kept.stdout
    raylet_gz = testbed.job_dir(job) / "logs" / "ray" / worker / "raylet.out.gz"
    assert stat.S_IMODE(raylet_gz.stat().st_mode) == 0o600
    unknown = testbed.raybridge(
        "login", "logs", job, "--node", worker, "--ray", "nope", "--profile", testbed.local_profile
    )
    assert unknown.returncode == 1 and "unknown Ray process 'nope'" in unknown.stderr
    testbed.wait_job_gone(job)
    assert_no_leaks(job)
    for n in range(1, 4):
        assert testbed.exec(f"n{n}", "test", "-e", f"/tmp/rb-{job}").returncode != 0  # temp dir removed
    again = testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
    assert again.returncode == 0 and "already" in again.stderr  # idempotent


def test_down_while_the_cluster_is_starting_needs_no_scancel(testbed):
    up = testbed.start_raybridge("login", "up", "--nodes", "3", "--profile", testbed.local_profile)
    try:
        job = job_id_from(up.stderr.readline())
        deadline = time.monotonic() + 120
        while not (testbed.job_dir(job) / "head.json").exists():  # nodes are joining now
            assert time.monotonic() < deadline, "the head never came up"
            time.sleep(0.1)
        d = testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
        assert d.returncode == 0, d.stderr
        testbed.wait_job_gone(job)
    finally:
        up.kill()
        up.wait()
    # The agents stopped on the stop request, even one still waiting for Ray to start: the job ended
    # on its own (COMPLETED) instead of being cancelled after the grace period.
    show = testbed.exec("login", "scontrol", "show", "job", job, check=True).stdout
    assert "JobState=COMPLETED" in show, show
    # The stop really came during bring-up: the cluster never became ready.
    record = testbed.job_dir(job) / "cluster.json"
    info = json.loads(record.read_text()) if record.exists() else {}
    assert not info.get("ready_at"), info
    assert_no_leaks(job)


@pytest.mark.parametrize("how", ["exec", "in-process"])
def test_run_propagates_the_driver_exit_code(testbed, how):
    """`python -c` is exec'd; `python SCRIPT` runs in the launcher's interpreter with Ray imported
    while the nodes joined. Either way: the address, the argv and the exit code are the program's."""
    driver = (
        "import os, ray, sys; ray.init(); "
        "print('driver nodes', len([n for n in ray.nodes() if n['Alive']]), os.environ['RAY_ADDRESS'], "
        "'args', sys.argv[1:], __name__); "
        "sys.exit(int(sys.argv[-1]))"
    )
    if how == "exec":
        code, command = 0, ["python", "-c", driver, "0"]
    else:
        script = f"{testbed.shared}/exit-code-driver.py"
        open(script, "w").write(driver.replace("; ", "\n"))
        code, command = 3, ["python", script, "it's a; $(x)", "3"]
    # The node agents' own lines are in the job log; on the terminal only with --verbose.
    verbose = ["--verbose"] if how == "in-process" else []
    r = testbed.raybridge(
        "login", "run", "--nodes", "2", *verbose, "--profile", testbed.local_profile, "--", *command
    )
    assert r.returncode == code, r.stderr + r.stdout
    assert "driver nodes 2 10.212.0." in r.stdout
    job = job_id_from(r.stderr)
    (log,) = (testbed.shared_dir / "logs").glob(f"*-{job}.out")
    if how == "in-process":
        assert "args [\"it's a; $(x)\", '3'] __main__" in r.stdout
        assert "running (in process, imported early: os, ray, sys)" in r.stdout
    else:
        assert "running (child process)" in log.read_text()
        assert "raybridge[" not in r.stdout and "environment ok" not in r.stdout, r.stdout
        assert f"exit code {code}; its log: {log}" in r.stderr
    testbed.wait_job_gone(job)
    assert_no_leaks(job)
    # ray.init() was not held while Ray started idle workers (the program ran no task: none started).
    raylets = sorted((testbed.job_dir(job) / "logs" / "ray").glob("*/raylet.out.gz"))
    assert len(raylets) == 2, raylets
    for raylet in raylets:
        assert "Started worker process" not in gzip.decompress(raylet.read_bytes()).decode(errors="replace")


def test_profile_ray_args_reach_every_node(testbed):
    # An option raybridge does not set itself goes through Ray's own `ray start` parser (in the agent).
    path = f"{testbed.shared}/ray-args.yaml"
    text = open(testbed.local_profile).read() + "ray_args:\n  - --resources\n  - '{\"rb_slot\": 2}'\n"
    open(path, "w").write(text)
    driver = "import ray; ray.init(); print('rb_slot total', ray.cluster_resources().get('rb_slot'))"
    r = testbed.raybridge("login", "run", "--nodes", "2", "--profile", path, "--", "python", "-c", driver)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "rb_slot total 4.0" in r.stdout
    (log,) = (testbed.shared_dir / "logs").glob(f"*-{job_id_from(r.stderr)}.out")
    text = log.read_text()
    assert (
        "starting Ray on" in text and "using the `ray start` command" not in text
    )  # in the agent, no fallback


def test_profile_ray_start_command_uses_rays_own_start(testbed):
    # The escape hatch when Ray's launcher inside the agent does not suit a site or a Ray version.
    path = f"{testbed.shared}/ray-start-command.yaml"
    open(path, "w").write(open(testbed.local_profile).read() + "ray_start: command\n")
    driver = "import ray; ray.init(); print('alive', len([n for n in ray.nodes() if n['Alive']]))"
    r = testbed.raybridge("login", "run", "--nodes", "2", "--profile", path, "--", "python", "-c", driver)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "alive 2" in r.stdout
    job = job_id_from(r.stderr)
    # The agents say so in the job log (`run` shows the program's output; --verbose adds their lines).
    (log,) = (testbed.shared_dir / "logs").glob(f"*-{job}.out")
    assert (
        log.read_text().count("using the `ray start` command (profile: ray_start: command)") == 2
    )  # both nodes
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def test_rendered_script_runs_with_plain_sbatch(testbed):
    script = f"{testbed.shared}/plain.sbatch"
    r = testbed.raybridge(
        "login",
        "render",
        "--nodes",
        "2",
        "--profile",
        testbed.local_profile,
        "-o",
        script,
        "--",
        "python",
        "-c",
        "import ray; ray.init(); print('plain nodes', len(ray.nodes()))",
    )
    assert r.returncode == 0, r.stderr
    out = f"{testbed.shared}/plain-%j.out"
    s = testbed.exec("login", "sbatch", "--wait", "--parsable", f"--output={out}", script, timeout=300)
    assert s.returncode == 0, s.stderr
    job = s.stdout.strip().split(";")[0]
    text = open(out.replace("%j", job)).read()
    assert "plain nodes 2" in text
    assert "driver exited with code 0" in text


def test_sbatch_rejection_is_one_line_and_submits_nothing(testbed):
    before = testbed.squeue_ids()
    r = testbed.raybridge(
        "login", "up", "--nodes", "2", "--partition", "nosuchpartition", "--profile", testbed.local_profile
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "raybridge: error: sbatch rejected the job: sbatch: error: invalid partition specified: nosuchpartition "
        "sbatch: error: Batch job submission failed: Invalid partition name specified"
    ]
    assert testbed.squeue_ids() == before


MARKER = "/srv/rbtb/shared/hostile-input-ran"  # shared storage: visible from the login node and here


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--job-name", f"evil'; touch {MARKER} #"],
            "job_name has characters Slurm or the shell would misread",
        ),
        (["--job-name", f"$(touch {MARKER})"], "job_name has characters Slurm or the shell would misread"),
        (["--job-name", f"a\ntouch {MARKER}"], "must not contain newlines"),
        (["--time", "forever"], "not a Slurm time"),
        (["--nodes", "0"], "nodes must be between 1"),
        (["--sbatch-arg", "--exclusive\n#SBATCH --nodes=4"], "must not contain newlines"),
        (["--sbatch-arg", "--job-name=x"], "may not set '--job-name'"),
        (["--profile", "env-newline"], "env.X must not contain newlines"),
        (["--profile", "env-name"], "env has an invalid variable name"),
    ],
)
def test_hostile_input_submits_nothing(testbed, args, message):
    Path(MARKER).unlink(missing_ok=True)
    hostile_env = {"env-newline": f'  X: "a\\ntouch {MARKER}"', "env-name": f'  "X; touch {MARKER}": "a"'}
    if args[0] == "--profile":  # a hostile value in the profile file, on top of the test bed's
        path = f"{testbed.shared}/{args[1]}.yaml"
        Path(path).write_text(Path(testbed.local_profile).read_text() + hostile_env[args[1]] + "\n")
        args = ["--profile", path]
    else:
        args = ["--profile", testbed.local_profile, *args]
    before = testbed.squeue_ids()
    r = testbed.raybridge("login", "up", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raybridge: error: "), r.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert testbed.squeue_ids() == before
    assert not Path(MARKER).exists(), "the payload ran"


def test_a_job_that_fails_on_its_own_is_reported_with_its_log(testbed):
    path = f"{testbed.shared}/broken-setup.yaml"
    text = (
        open(testbed.local_profile)
        .read()
        .replace("setup:\n", "setup:\n  - \"echo 'module load: cuda/99 not found' >&2; exit 3\"\n")
    )
    open(path, "w").write(text)
    r = testbed.raybridge("login", "up", "--nodes", "2", "--profile", path, timeout=180)
    job = job_id_from(r.stderr)
    assert r.returncode == 1
    assert f"raybridge: error: cluster {job} failed: job ended (FAILED" in r.stderr
    assert "module load: cuda/99 not found" in r.stderr  # the tail of the job's log
    assert job not in testbed.squeue_ids()


def test_a_job_still_running_when_raybridge_gives_up_is_cancelled(testbed):
    # The job runs (its setup hangs, as a stuck module load would) but never becomes a cluster:
    # at the deadline `up` cancels it instead of leaving it to burn the allocation.
    path = f"{testbed.shared}/hanging-setup.yaml"
    text = open(testbed.local_profile).read().replace("setup:\n", "setup:\n  - echo setup-hangs; sleep 300\n")
    open(path, "w").write(text)
    r = testbed.raybridge("login", "up", "--nodes", "2", "--profile", path, "--timeout", "8", timeout=120)
    job = job_id_from(r.stderr)
    assert r.returncode == 1
    assert re.search(
        rf"raybridge: error: cluster {job} not ready after 8s \(RUNNING, reason None\); job cancelled",
        r.stderr,
    ), r.stderr
    assert "setup-hangs" in r.stderr  # the tail of the job's log
    testbed.wait_job_gone(job)
    show = testbed.exec("login", "scontrol", "show", "job", job, check=True).stdout
    assert "JobState=CANCELLED" in show, show
    assert_no_leaks(job)
