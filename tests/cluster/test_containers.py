"""Containers on the real test bed, as alice: Charliecloud for real (a Debian image built here with
mmdebstrap, never pulled; the users' venv and the bed's Slurm config mounted from /srv/rbtb), and a
recording stand-in for Apptainer that checks the exact command every node runs."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml

from tests.cluster.bed import ROOT, TESTBED, all_job_ids, assert_no_leaks
from tests.cluster.test_training import (
    EVERY,
    STEPS,
    crash,
    finish,
    head_host,
    hosts,
    job_hosts,
    job_procs_in,
    run_dir,
    start_training,
    wait_progress,
)

pytestmark = pytest.mark.cluster
MARKER = "etc/raybridge-testbed-image"  # a file only the image has
ON_THE_HOST = {"slurm_script", "srun", "slurmstepd"}  # the batch script and Slurm's own, by design


@pytest.fixture(scope="module")
def image():
    """The bed's image (scripts/testbed image: built once, ~20 s, then reused)."""
    r = subprocess.run([TESTBED, "image"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def profile(testbed, name: str, **change) -> str:
    """The bed's local profile with `change` applied (container: merged into charliecloud defaults)."""
    values = yaml.safe_load(Path(testbed.local_profile).read_text())
    container = change.pop("container", {})
    values |= change
    values["container"] = {"runtime": "charliecloud", "mounts": [str(ROOT)], **container}
    return testbed.write(f"{testbed.shared}/{name}.yaml", yaml.safe_dump(values))


def inside(p: psutil.Process) -> bool:
    """The process runs in the image: its root is the image's (the marker is there) and its mount
    namespace is not its node's."""
    return os.path.exists(f"/proc/{p.pid}/root/{MARKER}")


def placement(node: str, job: str) -> tuple[list[str], list[str]]:
    """The job's own processes on a node, as (inside the image, on the host) names."""
    ins, outs = [], []
    for p in job_procs_in(node, job):
        try:
            (ins if inside(p) else outs).append(p.name())
        except psutil.Error:
            continue
    return ins, outs


def up(testbed, prof: str, nodes: int = 2, timeout: int = 120):
    return testbed.raybridge(
        "login", "up", "--nodes", str(nodes), "--profile", prof, "--timeout", str(timeout)
    )


def test_up_in_charliecloud_runs_every_ray_process_in_the_image_and_down_leaves_nothing(testbed, image):
    prof = profile(testbed, "charliecloud", container={"image": image})
    r = up(testbed, prof, nodes=3)
    assert r.returncode == 0, r.stderr[-3000:]
    job = re.search(r"Ray cluster ready: job (\d+)", r.stdout).group(1)
    try:
        check_cluster(testbed, prof, job)
    finally:
        down = testbed.raybridge("login", "down", job, "--profile", prof)
    assert down.returncode == 0, down.stderr
    assert_no_leaks(job, timeout=30)


def check_cluster(testbed, prof: str, job: str) -> None:
    info = testbed.cluster_json(job)
    # The node's own network: the head advertises its fabric address (no NAT, no bridge).
    assert info["head"]["ip"].startswith("10.212.0."), info["head"]
    head = head_host(testbed, job)
    for node in job_hosts(testbed, job):
        ins, outs = placement(node, job)
        assert "raylet" in ins, (node, ins, outs)
        assert set(outs) <= ON_THE_HOST, (node, outs)  # nothing of Ray or raybridge outside
        if node == head:
            assert "gcs_server" in ins
    uid = testbed.uid
    for node in job_hosts(testbed, job):
        for p in job_procs_in(node, job):
            assert p.uids().real == uid, (node, p.name())  # the user's own id inside, never root
    # A Ray task from the login node reaches Ray inside the containers.
    st = testbed.raybridge("login", "status", job, "--json", "--profile", prof)
    assert st.returncode == 0 and json.loads(st.stdout)["alive_nodes"] == 3, st.stdout + st.stderr
    logs = testbed.raybridge("login", "logs", job, "--profile", prof)
    assert "environment ok: /srv/rbtb/opt/venv/bin/python3" in logs.stdout, logs.stdout[-2000:]


def test_training_in_charliecloud_survives_a_worker_node_crash(testbed, image, crashed_nodes):
    prof = profile(testbed, "charliecloud-train", container={"image": image})
    proc, job = start_training(testbed, "--workers", "3", nodes=3, extra=("--spare-nodes", "1"), profile=prof)
    run = run_dir(testbed, job)
    wait_progress(testbed, run, EVERY + 15, proc)
    batch, *others = job_hosts(testbed, job)
    victim = sorted((set(others) - {head_host(testbed, job)}) & hosts(run, 0))[0]
    ins, outs = placement(victim, job)
    assert "raylet" in ins and set(outs) <= ON_THE_HOST, (ins, outs)
    assert any(n.startswith("ray::") for n in ins), ins  # the training worker itself
    crashed_nodes.append(victim)
    assert "raylet" in crash(victim, job)
    rc, result, out, err = finish(proc)
    assert rc == 0, out[-3000:] + err[-2000:]
    assert result["final_step"] == STEPS and result["restores"] >= 1
    assert 0 <= result["redone_steps"] <= EVERY
    assert_no_leaks(job, timeout=30)


def one_line_failure(r, *expected: str) -> str:
    """One error line (after `up`'s progress lines, when the job had started), no traceback."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if not re.match(r"(submitted job|\[ *[0-9.]+s\])", line)]
    assert len(errors) == 1, r.stderr
    for text in expected:
        assert text in errors[0], r.stderr
    return errors[0]


def test_container_problems_are_one_line(testbed, image):
    before = all_job_ids(testbed)
    # Before anything is submitted: no image there, or an image someone else can write.
    missing = profile(testbed, "no-image", container={"image": f"{image}-missing"})
    one_line_failure(up(testbed, missing), f"the charliecloud image {image}-missing is not there", "fix:")
    open_image = testbed.user_dir(f"{testbed.shared}/open-image")
    os.chmod(open_image, 0o777)
    writable = profile(testbed, "open-image", container={"image": str(open_image)})
    one_line_failure(up(testbed, writable), f"{open_image} is writable by others", "chmod go-w")
    assert all_job_ids(testbed) == before  # nothing reached Slurm
    # At the start, from inside the image: no raybridge in the image's own Python, and an image whose
    # raybridge is another version (a copy with another version first on its path).
    bare = profile(testbed, "bare-python", python="/usr/bin/python3", container={"image": image})
    one_line_failure(
        up(testbed, bare), "cannot import raybridge", f"in the container {image}: the image must"
    )
    other = testbed.user_dir(f"{testbed.shared}/other-raybridge")
    subprocess.run(["cp", "-r", f"{testbed.sources}/raybridge", str(other)], check=True)
    init = other / "raybridge" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "0.0.0+other"', init.read_text()))
    testbed.give_tree(other)
    env = {**yaml.safe_load(Path(testbed.local_profile).read_text())["env"], "PYTHONPATH": str(other)}
    mismatch = profile(testbed, "mismatch", env=env, container={"image": image})
    err = one_line_failure(up(testbed, mismatch), f"in the container {image} runs raybridge 0.0.0+other")
    assert "the image must carry raybridge" in err
    # A runtime the nodes do not have.
    sif = testbed.write(f"{testbed.shared}/image.sif", "")
    no_runtime = profile(testbed, "no-apptainer", container={"runtime": "apptainer", "image": sif})
    one_line_failure(up(testbed, no_runtime), "apptainer (Apptainer) is not installed here")


STAND_IN = """#!/bin/bash
# A stand-in for apptainer: writes down how it was called, then runs the command on the host (a
# container that changes nothing), so the rest of the job is real.
printf '%s %s\\n' "$(hostname -s)" "$(printf '%q ' "$0" "$@")" >>{calls}
shift  # exec
while [ $# -gt 0 ] && [[ $1 == --* ]]; do shift; done
shift  # the image
exec "$@"
"""


def test_apptainer_stand_in_sees_the_exact_command_on_every_node(testbed):
    base = testbed.user_dir(f"{testbed.shared}/stand-in")
    calls = base / "calls"
    testbed.write(calls, "")
    (base / "bin").mkdir(exist_ok=True)
    testbed.write(base / "bin" / "apptainer", STAND_IN.format(calls=shlex.quote(str(calls))), mode=0o755)
    testbed.give(base / "bin", 0o755)
    sif = testbed.write(f"{testbed.shared}/torch.sif", "")
    setup = [
        *yaml.safe_load(Path(testbed.local_profile).read_text())["setup"],
        f'export PATH={base}/bin:"$PATH"',
    ]
    prof = profile(
        testbed,
        "apptainer",
        setup=setup,
        container={"runtime": "apptainer", "image": sif, "mounts": ["/srv/rbtb/opt", "/data set:/data"]},
    )
    r = up(testbed, prof, nodes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    job = re.search(r"Ray cluster ready: job (\d+)", r.stdout).group(1)
    nodes = job_hosts(testbed, job)
    shared_dir, workdir = str(testbed.shared_dir), str(testbed.home)
    expected = ["apptainer", "exec", "--bind=/data set:/data", "--bind=/srv/rbtb/opt"]
    expected += sorted([f"--bind={shared_dir}", f"--bind={workdir}"], key=lambda b: (b.count("/"), b))
    expected += [f"--pwd={workdir}", sif, "python3", "-P", "-m"]
    seen = {}
    for line in calls.read_text().splitlines():
        host, _, argv = line.partition(" ")
        words = shlex.split(argv)
        words[0] = os.path.basename(words[0])
        seen.setdefault(host, []).append(words)
    assert set(seen) == set(nodes), seen
    for host in nodes:
        agents = [w for w in seen[host] if w[-2:] == ["raybridge.agent", "node"]]
        assert len(agents) == 1 and agents[0][: len(expected)] == expected, seen[host]
    batch = seen[nodes[0]]
    assert [w[len(expected) :] for w in batch if w[-1] != "node"] == [
        ["raybridge.envcheck"],
        ["raybridge.agent", "prepare"],
    ]
    down = testbed.raybridge("login", "down", job, "--profile", prof)
    assert down.returncode == 0, down.stderr
    assert_no_leaks(job, timeout=30)


def stage(testbed, archive: str, prof: str):
    """`raybridge image stage` of the archive as the bed's image `bookworm`, as the user."""
    return testbed.raybridge(
        "login",
        "image",
        "stage",
        archive,
        "--name",
        "bookworm",
        "--runtime",
        "charliecloud",
        "--profile",
        prof,
    )


def test_a_staged_image_of_the_users_own_gets_its_mount_points_and_runs(testbed, image):
    """`raybridge image stage` as alice from a tar archive (as `ch-image export` or `docker export`
    writes one); the staged copy lacks the folder a mount needs, which `up` makes in her own image."""
    archive = f"{testbed.shared}/bookworm.tar"
    staged = f"{testbed.shared_dir}/images/bookworm"
    shutil.rmtree(staged, ignore_errors=True)  # an earlier run's
    subprocess.run(["tar", "-C", image, "--exclude=./dev/*", "-cf", archive, "."], check=True)
    testbed.give(archive, 0o644)
    prof = profile(testbed, "staged", container={"image": "/unused"})
    r = stage(testbed, archive, prof)
    assert r.returncode == 0, r.stderr
    assert f"image: {staged}" in r.stdout and f"staged {staged}" in r.stderr
    st = os.stat(staged)
    assert st.st_uid == testbed.uid and not st.st_mode & 0o022
    testbed.exec("login", "rmdir", f"{staged}{ROOT}", check=True)  # the mount point /srv/rbtb
    prof = profile(testbed, "staged", container={"image": staged})
    r = up(testbed, prof, nodes=1)
    assert r.returncode == 0, r.stderr[-3000:]
    job = re.search(r"Ray cluster ready: job (\d+)", r.stdout).group(1)
    assert os.path.isdir(f"{staged}{ROOT}")
    down = testbed.raybridge("login", "down", job, "--profile", prof)
    assert down.returncode == 0, down.stderr
    assert_no_leaks(job, timeout=30)
    again = stage(testbed, archive, prof)
    one_line_failure(again, "exists already (--replace to stage it again)")


def test_doctor_runs_its_node_checks_inside_the_container(testbed, image):
    prof = profile(testbed, "charliecloud-doctor", container={"image": image})
    r = testbed.raybridge("login", "doctor", "--profile", prof, "--nodes", "2", "--json")
    checks = json.loads(r.stdout) if r.stdout.strip().startswith("[") else None
    assert checks is not None, r.stderr[-2000:]
    failed = [c for c in checks if c["status"] == "fail"]
    assert r.returncode == 0 and not failed, failed
    assert any(c["check"] == "container" and c["status"] == "pass" for c in checks), checks
    versions = [c for c in checks if c["check"] == "versions"]
    assert len(versions) == 2 and all(c["status"] == "pass" for c in versions), versions
    # The same profile with an image Python that lacks raybridge: the doctor's step says so per node.
    bare = profile(testbed, "charliecloud-doctor-bare", python="/usr/bin/python3", container={"image": image})
    r = testbed.raybridge("login", "doctor", "--profile", bare, "--nodes", "2", "--json")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def podman_problem(image: str) -> str | None:
    """Why podman cannot run a container on this machine, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    r = subprocess.run(
        ["podman", "run", "--rm", "--network=host", f"--rootfs={image}", "/bin/true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        return "podman cannot start a container here: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
    return None


def test_podman_for_real_where_podman_can_start_containers(testbed, image):
    """The same cluster under podman (the bed's image imported into root's store is not a user's, so
    the image is imported into alice's own store first). Skipped, with its reason, where podman cannot
    start a container (this machine's sandbox refuses crun/runc their setrlimit)."""
    if why := podman_problem(image):
        pytest.skip(why)
    archive = f"{testbed.shared}/bookworm-podman.tar"
    subprocess.run(["tar", "-C", image, "--exclude=./dev/*", "-cf", archive, "."], check=True)
    testbed.give(archive, 0o644)
    testbed.exec("login", "podman", "import", archive, "localhost/raybridge-testbed:latest", check=True)
    prof = profile(
        testbed, "podman", container={"runtime": "podman", "image": "localhost/raybridge-testbed:latest"}
    )
    r = up(testbed, prof, nodes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    job = re.search(r"Ray cluster ready: job (\d+)", r.stdout).group(1)
    try:
        for node in job_hosts(testbed, job):
            ins, _ = placement(node, job)
            assert "raylet" in ins, (node, ins)
    finally:
        down = testbed.raybridge("login", "down", job, "--profile", prof)
    assert down.returncode == 0, down.stderr
    assert_no_leaks(job, timeout=30)
