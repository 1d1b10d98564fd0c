"""Users as on a shared site: alice and bob in project proj42, carol outside it, on the same login
node and compute nodes. Each test shows what another user can and cannot do to alice's cluster,
and that raybridge refuses what someone else could have written, in one line."""

import hashlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.bed import PYTHON, RAYBRIDGE, TESTBED, assert_no_leaks, job_procs

pytestmark = pytest.mark.cluster

GCS_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)
    print("ALLOWED", len(nodes))
except Exception as e:
    print("REFUSED", type(e).__name__, str(e).splitlines()[0][:120])
"""
REFUSED = "REFUSED AuthenticationError RPC error: InvalidAuthToken"


def job_id_from(stderr: str) -> str:
    m = re.search(r"submitted job (\d+)", stderr)
    assert m, stderr
    return m.group(1)


def one_line_error(r) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raybridge: error: "), r.stderr
    return lines[0]


def probe_gcs(bed, address: str, token_path: str) -> str:
    env = ["env", "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={token_path}"]
    return bed.exec("login", *env, PYTHON, "-c", GCS_PROBE, address, timeout=120).stdout.strip()


def owners(job_id: str) -> set[str]:
    """The user names that the job's processes (anywhere on the machine) run as."""
    names = set()
    for p in job_procs(job_id):
        try:
            names.add(p.username())
        except Exception:
            continue
    return names


def test_two_users_share_nodes_and_neither_reaches_the_others_cluster(testbed, bob):
    args = ("--nodes", "2", "--partition", "shared", "--json", "--sbatch-arg=--nodelist=n1,n2")
    pa = testbed.start_raybridge("login", "up", *args, "--profile", testbed.local_profile)
    pb = bob.start_raybridge("login", "up", *args, "--profile", bob.local_profile)
    results = [p.communicate(timeout=300) for p in (pa, pb)]
    jobs = [job_id_from(err) for _, err in results]
    try:
        for p, (out, err) in zip((pa, pb), results, strict=True):
            assert p.returncode == 0, err + out
        a, b = (json.loads(out) for out, _ in results)
        assert {n["hostname"] for n in a["nodes"]} == {n["hostname"] for n in b["nodes"]} == {"n1", "n2"}
        # Each cluster runs as its own user, every process of it.
        assert owners(a["job_id"]) == {"alice"} and owners(b["job_id"]) == {"bob"}
        ports_a = set(testbed.cluster_json(a["job_id"])["ports"].values())
        ports_b = set(bob.cluster_json(b["job_id"])["ports"].values())
        assert ports_a.isdisjoint(ports_b)
        # Neither can read the other's token, job folder or logs.
        for who, path in (
            (bob, a["token_path"]),
            (bob, os.path.dirname(a["token_path"])),
            (bob, str(testbed.shared_dir / "logs")),
            (testbed, b["token_path"]),
        ):
            r = who.exec("login", "cat" if path.endswith("token") else "ls", path)
            assert r.returncode != 0 and "Permission denied" in r.stderr, (who.user, path, r.stdout)
        # Each cluster answers its own user's token and refuses the other's (Ray's own refusal).
        assert probe_gcs(testbed, a["address"], a["token_path"]) == "ALLOWED 2"
        assert probe_gcs(bob, b["address"], b["token_path"]) == "ALLOWED 2"
        assert probe_gcs(bob, a["address"], b["token_path"]).startswith(REFUSED)
        assert probe_gcs(testbed, b["address"], a["token_path"]).startswith(REFUSED)
        api = a["dashboard_url"] + "/api/version"
        assert int(bob.http("login", api)) in (401, 403)
        assert int(bob.http("login", api, b["token_path"])) in (401, 403)
        assert int(testbed.http("login", api, a["token_path"])) == 200
        # bob's raybridge will not act on alice's job: one line, and her cluster is untouched.
        for cmd in (("down", a["job_id"]), ("status", a["job_id"]), ("logs", a["job_id"])):
            r = bob.raybridge("login", *cmd, "--profile", bob.local_profile)
            assert one_line_error(r) == (
                f"raybridge: error: job {a['job_id']} belongs to alice: raybridge acts only on your own jobs"
            ), cmd
        # Slurm agrees: bob cannot cancel it either.
        assert bob.exec("login", "scancel", a["job_id"]).returncode != 0
        # alice's down stops hers only; bob's cluster is still whole.
        down = testbed.raybridge("login", "down", a["job_id"], "--profile", testbed.local_profile)
        assert down.returncode == 0, down.stderr
        testbed.wait_job_gone(a["job_id"])
        assert_no_leaks(a["job_id"])
        st = bob.raybridge("login", "status", b["job_id"], "--json", "--profile", bob.local_profile)
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["alive_nodes"] == 2
        assert probe_gcs(bob, b["address"], b["token_path"]) == "ALLOWED 2"
    finally:
        testbed.raybridge("login", "down", jobs[0], "--profile", testbed.local_profile)
        bob.raybridge("login", "down", jobs[1], "--profile", bob.local_profile)
    for job in jobs:
        testbed.wait_job_gone(job)
        assert_no_leaks(job)


def test_first_contact_from_home_with_no_profile_and_a_raybridge_folder_there(carol):
    """carol: no profile, her home as working directory, raybridge from the site's venv (a wheel).
    The default shared folder ~/raybridge sits in the job's working directory; a planted package
    there must not shadow raybridge in the job (its Python never imports from the working directory)."""
    decoy = carol.home / "raybridge"
    carol.exec("login", "mkdir", "-p", str(decoy), check=True)
    carol.write(decoy / "__init__.py", "raise SystemExit('imported from the working directory')\n")
    carol.write(decoy / "agent.py", "raise SystemExit('imported from the working directory')\n")
    assert not any(carol.home.glob(".config/raybridge/*.yaml")), "carol must have no profile"
    r = carol.raybridge(
        "login", "run", "--nodes", "1", "--", "python", "-c", "import ray; print('ran', ray.__version__)"
    )
    job = job_id_from(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert re.search(r"^ran \d", r.stdout, re.M), r.stdout
    assert "imported from the working directory" not in r.stdout + r.stderr
    # The job ran as carol, from her home, with its files in her default shared folder.
    (log,) = (carol.home / "raybridge" / "logs").glob(f"*-{job}.out")
    assert log.stat().st_uid == carol.uid
    carol.wait_job_gone(job)
    assert_no_leaks(job)


def test_a_shared_folder_others_can_replace_is_refused_before_anything_runs(testbed, bob):
    # A project folder as many sites make it: group-writable and setgid, but without the sticky bit,
    # so any member of the group can rename alice's folder and put one of their own in its place.
    open_project = Path(testbed.env["RAYBRIDGE_TESTBED_ROOT"]) / "proj42-open"
    testbed.admin(
        "login",
        "sh",
        "-c",
        f"rm -rf {open_project} && mkdir -m 2770 {open_project} && chgrp proj42 {open_project}",
        check=True,
    )
    assert stat.S_IMODE(open_project.stat().st_mode) == 0o2770
    shared_dir = open_project / "alice" / "raybridge"
    profile = testbed.write(
        Path(testbed.shared) / "open-project.yaml",
        Path(testbed.local_profile)
        .read_text()
        .replace(f"shared_dir: {testbed.shared_dir}", f"shared_dir: {shared_dir}"),
    )
    testbed.user_dir(shared_dir)
    # bob can do what the rule is about:
    r = bob.exec("login", "mv", str(open_project / "alice"), str(open_project / "alice-old"))
    assert r.returncode == 0, r.stderr
    bob.exec("login", "mkdir", "-p", str(shared_dir), check=True)
    before = testbed.squeue_ids()
    for cmd in (("up", "--nodes", "1"), ("run", "--nodes", "1")):
        r = testbed.raybridge(
            "login", *cmd, "--profile", profile, *(["--", "true"] if cmd[0] == "run" else [])
        )
        line = one_line_error(r)
        assert f"{open_project} is writable by others (mode 2770)" in line, line
        assert f"chmod +t {open_project}" in line, line
    assert testbed.squeue_ids() == before
    # In the bed's real project folder (sticky), bob can neither move nor replace alice's folder.
    project = Path(testbed.env["RAYBRIDGE_TESTBED_PROJECT"])
    testbed.user_dir(testbed.shared_dir)
    r = bob.exec("login", "mv", str(project / "alice"), str(project / "alice-old"))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    testbed.admin("login", "rm", "-rf", str(open_project), check=True)


def test_a_member_script_someone_else_could_change_is_not_submitted(testbed, crashed_nodes):
    """The head submits <job folder>/member.sbatch when a node dies (--replace-lost): it does so only if
    nobody but the user could have changed it since `up` wrote it."""
    p = testbed.local_profile
    up = testbed.raybridge("login", "up", "--nodes", "3", "--replace-lost", "1", "--profile", p)
    job = job_id_from(up.stderr)
    try:
        assert up.returncode == 0, up.stderr
        script = testbed.job_dir(job) / "member.sbatch"
        assert stat.S_IMODE(script.stat().st_mode) & 0o022 == 0
        assert stat.S_IMODE(script.parent.stat().st_mode) == 0o700
        # A mistake, or a colleague's doing on a folder that allowed it: the script becomes group-writable.
        testbed.exec("login", "chmod", "g+w", str(script), check=True)
        info = testbed.cluster_json(job)
        batch = testbed.exec("login", "squeue", "-h", "-j", job, "-o", "%B", check=True).stdout.strip()
        victim = next(
            n["hostname"] for n in info["nodes"] if n["hostname"] not in (batch, info["head"]["hostname"])
        )
        before = set(testbed.squeue_ids())
        crashed_nodes.append(victim)
        subprocess.run([TESTBED, "crash", victim], check=True, capture_output=True)

        def refused():
            st = testbed.raybridge("login", "status", job, "--json", "--profile", p)
            return [e for e in json.loads(st.stdout)["events"] if e["event"] == "not_replaced"]

        deadline = time.monotonic() + 120
        while not (nope := refused()):
            assert time.monotonic() < deadline, "no not_replaced event"
            time.sleep(1)
        assert nope[0]["node"] == victim
        assert f"member script refused: {script} is writable by others" in nope[0]["detail"], nope
        assert set(testbed.squeue_ids()) <= before  # nothing submitted
    finally:
        testbed.raybridge("login", "down", job, "--profile", p)
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def test_profiles_another_user_could_write_are_refused(testbed, bob):
    text = Path(testbed.local_profile).read_text()
    # bob's own file, readable by alice: its `setup` lines would run as alice.
    theirs = bob.write(Path(bob.shared) / "for-alice.yaml", text)
    r = testbed.raybridge("login", "up", "--nodes", "1", "--profile", theirs)
    line = one_line_error(r)
    assert "belongs to bob" in line or "belongs to another user" in line, line
    # alice's own, but group-writable.
    mine = testbed.write(Path(testbed.shared) / "group-writable.yaml", text, mode=0o664)
    r = testbed.raybridge("login", "up", "--nodes", "1", "--profile", mine)
    line = one_line_error(r)
    assert "writable by others" in line and f"chmod go-w {mine}" in line, line


def test_a_pull_into_a_shared_folder_ignores_a_partial_folder_planted_by_another_user(testbed, bob):
    run = testbed.user_dir(testbed.shared_dir / "runs" / "planted") / "checkpoint_000001"
    testbed.user_dir(run)
    testbed.write(run / "state.pt", "m" * 1000)
    digest = hashlib.sha256((run / "state.pt").read_bytes()).hexdigest()
    testbed.write(run / "raybridge-checkpoint.json", json.dumps({"sha256": digest, "step": 1}))
    # A destination others can create files in (sticky, like /tmp): bob plants the partial folder with
    # a link that points into alice's home.
    dest = Path(testbed.env["RAYBRIDGE_TESTBED_SHARED"]) / "drop"
    testbed.admin("login", "sh", "-c", f"rm -rf {dest} && mkdir -m 1777 {dest}", check=True)
    partial = dest / ".partial-checkpoint_000001"
    bob.exec("login", "mkdir", "-m", "0777", str(partial), check=True)
    bob.exec("login", "ln", "-s", str(testbed.home / "victim"), str(partial / "state.pt.part"), check=True)
    r = testbed.raybridge(
        "laptop", "checkpoints", "pull", "planted", str(dest), "--latest", "--profile", testbed.remote_profile
    )
    line = one_line_error(r)
    assert str(partial) in line and "remove it and pull again" in line, line
    assert not (testbed.home / "victim").exists()
    assert not (dest / "checkpoint_000001").exists()
    testbed.admin("login", "rm", "-rf", str(dest), str(run.parent), check=True)


def test_the_bed_runs_raybridge_as_a_normal_user(testbed):
    r = testbed.exec("login", "id", "-u", check=True)
    assert int(r.stdout) != 0
    assert testbed.exec("login", RAYBRIDGE, "--version", check=True).stdout.startswith("raybridge ")
    # The users' venv: Debian's python3, not the checkout's (whose interpreter other users cannot run).
    base = testbed.exec(
        "login", PYTHON, "-c", "import sys; print(sys.base_prefix)", check=True
    ).stdout.strip()
    assert base == "/usr"
