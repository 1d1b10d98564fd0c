"""Reaching a cluster from the laptop: tunnel, browser, Ray Jobs, logs, checkpoints, reconnects."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.bed import PYTHON, RAYBRIDGE, assert_no_leaks

pytestmark = pytest.mark.cluster
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def remote(testbed):
    """One 2-node cluster, brought up from the laptop, with a background tunnel on port 18265."""
    r = testbed.raybridge("laptop", "up", "--nodes", "2", "--profile", testbed.remote_profile)
    job = re.search(r"submitted job (\d+)", r.stderr).group(1)
    assert r.returncode == 0, r.stderr + r.stdout
    t = testbed.raybridge(
        "laptop", "tunnel", job, "--background", "--local-port", "18265", "--profile", testbed.remote_profile
    )
    assert t.returncode == 0, t.stderr + t.stdout
    exports = re.search(r"export (RAY_ADDRESS=.*)", t.stdout).group(1).split()
    env = dict(e.split("=", 1) for e in exports)
    login_url = re.search(r"browser +(http://\S+)", t.stdout).group(1)
    yield {"job": job, "env": env, "login_url": login_url, "info": testbed.cluster_json(job)}
    stop = testbed.raybridge("laptop", "tunnel", "--stop", job)
    assert stop.returncode == 0, stop.stderr
    # Nothing listens on the tunnel's port any more (a connection is refused at once).
    assert "ERR" in http(testbed, "http://127.0.0.1:18265/api/version") and "refused" in http(
        testbed, "http://127.0.0.1:18265/api/version"
    )
    testbed.raybridge("laptop", "down", job, "--profile", testbed.remote_profile)
    testbed.wait_job_gone(job)
    assert_no_leaks(job)


def http(testbed, url, token=None):
    return testbed.http("laptop", url, token)


def test_tunnel_reaches_the_dashboard_and_direct_access_does_not(testbed, remote):
    token = remote["env"]["RAY_AUTH_TOKEN_PATH"]
    assert oct(os.stat(token).st_mode & 0o777) == "0o600"
    assert http(testbed, "http://127.0.0.1:18265/api/version", token) == "200"
    assert http(testbed, "http://127.0.0.1:18265/api/version") == "401"  # the tunnel adds no credentials
    direct = remote["info"]["dashboard_url"] + "/api/version"
    assert http(testbed, direct, token).startswith("ERR") and "unreachable" in http(testbed, direct, token)


def test_browser_signs_in_and_shows_the_nodes(testbed, remote, tmp_path):
    # The test bed runs as root, and scripts/test installs Chromium there: its absence is a broken
    # setup, not a reason to pass without looking at the page.
    assert CHROMIUM, "chromium is not installed (scripts/test installs it; apt-get install chromium)"
    profile = f"{testbed.shared}/chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=30000",
        "--window-size=1400,900",
    ]
    ips = [node["ip"] for node in remote["info"]["nodes"]]

    def browse(*args):
        return testbed.exec("laptop", CHROMIUM, *flags, *args, timeout=120).stdout

    def new_link():
        r = testbed.raybridge("laptop", "tunnel", "--login-link", remote["job"])
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    # Sign in and look at the cluster page in one browser session. A dashboard that has not served a
    # page yet can take longer than the browser waits on these 2 shared cores: then once more, with
    # a new link (the first one is used up either way).
    dom = browse("--dump-dom", remote["login_url"] + "?next=%2F%23%2Fcluster")
    if not all(ip in dom for ip in ips):
        dom = browse("--dump-dom", new_link() + "?next=%2F%23%2Fcluster")
    assert all(ip in dom for ip in ips), f"nodes {ips} not on the dashboard's cluster page"
    # The link works once; the cookie lives as long as the browser session (a new one is not signed in).
    assert "sign-in link used or expired" in browse("--dump-dom", remote["login_url"])
    assert not any(ip in browse("--dump-dom", "http://127.0.0.1:18265/#/cluster") for ip in ips)
    # A new link from the background tunnel signs the next browser session in.
    link = new_link()
    assert link.startswith("http://127.0.0.1:18265/raybridge/login/") and link != remote["login_url"]
    dom = browse("--dump-dom", link + "?next=%2F%23%2Fcluster")
    assert all(ip in dom for ip in ips), f"nodes {ips} not on the page after signing in with the new link"


def test_plain_ray_job_submit_through_the_tunnel(testbed, remote):
    env = [f"{k}={v}" for k, v in remote["env"].items()]
    ray = str(Path(RAYBRIDGE).with_name("ray"))
    ok = testbed.exec(
        "laptop", "env", *env, ray, "job", "submit", "--", "python", "-c", "print(6 * 7)", timeout=180
    )
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "succeeded" in ok.stdout + ok.stderr
    assert re.search(r"(?m)^42$", ok.stdout), ok.stdout  # the job's own output line, not an id or a time
    no_token = testbed.exec(
        "laptop",
        "env",
        f"RAY_ADDRESS={remote['env']['RAY_ADDRESS']}",
        ray,
        "job",
        "submit",
        "--",
        "true",
        timeout=120,
    )
    assert no_token.returncode != 0
    assert "token" in (no_token.stdout + no_token.stderr).lower()


def test_another_user_on_the_laptop_cannot_use_the_tunnel(testbed, remote, bob):
    """bob shares the laptop (a shared workstation, a jump host): alice's tunnel port is open to him, as
    any local port is, but without her token or a session of her browser the dashboard refuses him."""
    url = "http://127.0.0.1:18265/api/version"
    assert bob.http("laptop", url) == "401"
    cookie = "import sys, urllib.request as u; r = u.Request(sys.argv[1], headers={'Cookie': 'raybridge-session=x'})\n"
    cookie += (
        "try: print(u.urlopen(r, timeout=10).status)\nexcept Exception as e: print(getattr(e, 'code', e))"
    )
    assert bob.exec("laptop", PYTHON, "-c", cookie, url, check=True).stdout.strip() == "401"
    token = remote["env"]["RAY_AUTH_TOKEN_PATH"]
    r = bob.exec("laptop", "cat", token)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert http(testbed, url, token) == "200"  # alice's own still works


@pytest.mark.parametrize("code", [0, 3])
def test_raybridge_submit_follow_returns_the_job_status(testbed, remote, code):
    wd = Path(testbed.shared) / f"wd-{code}"
    wd.mkdir(exist_ok=True)
    (wd / "job.py").write_text(
        "import sys\nfor i in range(3): print('step', i, flush=True)\nsys.exit(int(sys.argv[1]))\n"
    )
    r = testbed.raybridge(
        "laptop",
        "submit",
        "--job",
        remote["job"],
        "--working-dir",
        str(wd),
        "--follow",
        "--profile",
        testbed.remote_profile,
        "--",
        "python",
        "job.py",
        str(code),
    )
    assert r.returncode == (0 if code == 0 else 1), r.stderr + r.stdout
    assert "step 2" in r.stdout
    assert ("SUCCEEDED" if code == 0 else "FAILED") in r.stderr
    ray_job = r.stdout.split()[0]
    listing = testbed.raybridge(
        "laptop", "jobs", remote["job"], "--json", "--profile", testbed.remote_profile
    )
    assert ray_job in {j["id"] for j in json.loads(listing.stdout)}
    logs = testbed.raybridge(
        "laptop", "logs", remote["job"], "--ray-job", ray_job, "--profile", testbed.remote_profile
    )
    assert "step 1" in logs.stdout


def test_slurm_logs(testbed, remote):
    r = testbed.raybridge("laptop", "logs", remote["job"], "--profile", testbed.remote_profile)
    assert r.returncode == 0 and "cluster ready" in r.stdout


def sshd_sessions():
    main = Path("/srv/rbtb/state/pids/sshd.pid").read_text().strip()
    return [p for p in psutil.Process(int(main)).children(recursive=True)]


def test_tunnel_reconnects_after_the_ssh_connection_dies(testbed, remote):
    token = remote["env"]["RAY_AUTH_TOKEN_PATH"]
    log = testbed.home / ".cache" / "raybridge" / "tunnels" / f"{remote['job']}.log"
    before = log.read_text().count("reconnected") if log.exists() else 0
    victims = sshd_sessions()
    assert victims, "the tunnel's SSH session should be visible on the login node"
    for p in victims:
        p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while log.read_text().count("reconnected") <= before:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    assert http(testbed, "http://127.0.0.1:18265/api/version", token) == "200"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mark_complete(folder: Path) -> None:
    """What raybridge.train writes last: state.pt's sha256 in the completion marker."""
    state = folder / "state.pt"
    if not state.exists():
        state.write_bytes(os.urandom(100))
    (folder / "raybridge-checkpoint.json").write_text(json.dumps({"sha256": sha256(state), "step": 1}))


def test_checkpoint_pull_is_byte_identical_and_resumes(testbed, remote):
    run = testbed.user_dir(testbed.shared_dir / "runs") / "pull-test"
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoint_000000").mkdir(parents=True)
    (run / "checkpoint_000001" / "shards").mkdir(parents=True)
    (run / "checkpoint_000000" / "model.pt").write_bytes(os.urandom(1000))
    (run / "checkpoint_000001" / "meta.json").write_text('{"epoch": 2}')
    for i in range(3):
        (run / "checkpoint_000001" / "shards" / f"s{i}.bin").write_bytes(os.urandom(120_000_000))
    mark_complete(run / "checkpoint_000001")
    testbed.give_tree(run)
    dest = Path(testbed.shared) / "pulled"
    shutil.rmtree(dest, ignore_errors=True)
    ls = testbed.raybridge("laptop", "checkpoints", "ls", "pull-test", "--profile", testbed.remote_profile)
    assert "checkpoint_000001" in ls.stdout and "6 files" in ls.stdout
    assert "checkpoint_000000" in ls.stdout and "(incomplete: no completion marker)" in ls.stdout
    # Interrupt a parallel pull once a few ranges are recorded done: nothing may look complete.
    p = testbed.start_raybridge(
        "laptop",
        "checkpoints",
        "pull",
        "pull-test",
        str(dest),
        "--latest",
        "--streams",
        "2",
        "--profile",
        testbed.remote_profile,
        output=False,
    )
    partial = dest / ".partial-checkpoint_000001"

    def recorded() -> dict[str, list[int]]:
        out = {}
        for f in partial.rglob("*.part.done"):
            with contextlib.suppress(OSError):
                out[str(f.relative_to(partial))[: -len(".part.done")]] = [
                    int(x) for x in f.read_text().split()
                ]
        return out

    deadline = time.monotonic() + 120
    while sum(map(len, recorded().values())) < 2:
        assert time.monotonic() < deadline and p.poll() is None, (
            "pull finished before it could be interrupted"
        )
        time.sleep(0.02)
    kids = psutil.Process(p.pid).children(recursive=True)
    # The bytes come through the user's own OpenSSH client (one master connection per stream).
    assert any(k.name() == "ssh" for k in kids), [k.name() for k in kids]
    for proc in kids + [psutil.Process(p.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a range's session may have just ended
            proc.kill()
    p.wait()
    done = recorded()
    assert sum(map(len, done.values())) < 6, (
        "pull got too far before it was interrupted"
    )  # 3 files x 2 ranges
    assert not (dest / "checkpoint_000001").exists()
    # A range recorded as done is not read again: change one byte of one here, and the resumed pull
    # must find the file wrong (its sha256) instead of silently fetching that range again...
    name, offsets = next((k, v) for k, v in sorted(done.items()) if v)
    with open(partial / f"{name}.part", "r+b") as f:
        f.seek(offsets[0] + 10)
        byte = f.read(1)
        f.seek(offsets[0] + 10)
        f.write(bytes([byte[0] ^ 0xFF]))

    def pull_again():
        prof = ("--profile", testbed.remote_profile)
        return testbed.raybridge("laptop", "checkpoints", "pull", "pull-test", str(dest), *prof, timeout=300)

    r = pull_again()
    assert r.returncode == 1, r.stderr
    assert f"{name}: copy does not match the source (sha256)" in r.stderr
    assert "(1 file(s) to copy again, the others are kept)" in r.stderr
    assert not (dest / "checkpoint_000001").exists()
    # The files this pull verified: the next pull must keep them as they are (the same inode and mtime
    # in the final folder), not fetch them again.
    kept = {
        f.relative_to(partial): (st.st_ino, st.st_mtime_ns)
        for f in partial.rglob("*")
        if f.is_file() and ".part" not in f.name and (st := f.stat())
    }
    assert len(kept) >= 5, kept  # all but the one copied again
    # ...and the next pull copies that one file again and completes.
    r = pull_again()
    assert r.returncode == 0, r.stderr
    assert "sha256 verified" in r.stderr
    assert not partial.exists()
    for name, before in kept.items():
        after = (dest / "checkpoint_000001" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == before, f"{name} was fetched again"
    for f in (run / "checkpoint_000001").rglob("*"):
        if f.is_file():
            copy = dest / "checkpoint_000001" / f.relative_to(run / "checkpoint_000001")
            assert sha256(copy) == sha256(f)
    again = testbed.raybridge(
        "laptop",
        "checkpoints",
        "pull",
        "pull-test",
        str(dest),
        "--name",
        "checkpoint_000001",
        "--profile",
        testbed.remote_profile,
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    shutil.rmtree(run)
    shutil.rmtree(dest)


def one_line(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raybridge: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_bad_input(testbed, remote):
    prof = ["--profile", testbed.remote_profile]
    assert "no such job: 99999" in one_line(testbed.raybridge("laptop", "tunnel", "99999", *prof))
    assert "not a Slurm job id" in one_line(testbed.raybridge("laptop", "tunnel", "12;rm", *prof))
    busy = one_line(testbed.raybridge("laptop", "tunnel", remote["job"], "--local-port", "18265", *prof))
    assert "local port 18265 is in use" in busy
    assert "no Ray job 'nope'" in one_line(
        testbed.raybridge("laptop", "logs", remote["job"], "--ray-job", "nope", *prof)
    )
    missing = testbed.raybridge(
        "laptop", "checkpoints", "pull", "missing-run", "/tmp/x", "--name", "x", *prof
    )
    assert "no run folder" in one_line(missing)


def test_finished_job_and_dead_dashboard(testbed, remote):
    prof = ["--profile", testbed.remote_profile]
    done = testbed.raybridge("laptop", "run", "--nodes", "1", "--partition", "shared", *prof, "--", "true")
    finished = re.search(r"submitted job (\d+)", done.stderr).group(1)
    testbed.wait_job_gone(finished)
    assert_no_leaks(finished)
    assert re.search(
        r"job \d+ is (not running|gone)", one_line(testbed.raybridge("laptop", "tunnel", finished, *prof))
    )
    # Kill the dashboard of the module's cluster (this test runs last in the module).
    dash = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "dashboard.py" in " ".join(p.info["cmdline"] or [])
        and p.environ().get("RAYBRIDGE_JOB_ID") == remote["job"]
    ]
    assert dash
    for p in dash:
        p.kill()
    psutil.wait_procs(dash, timeout=10)
    msg = one_line(testbed.raybridge("laptop", "jobs", remote["job"], *prof))
    assert "did not answer" in msg or "refused" in msg


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_pull_refuses_hostile_names_and_writes_nothing_outside_dest(testbed, remote):
    # Anyone who can write the run folder (training code, a colleague, a Ray job) controls its names.
    run = testbed.user_dir(testbed.shared_dir / "runs") / "hostile"
    shutil.rmtree(run, ignore_errors=True)
    area = Path(testbed.shared) / "pull-area"
    shutil.rmtree(area, ignore_errors=True)
    dest = area / "dest"
    dest.mkdir(parents=True)
    (area / "decoy").write_text("outside DEST")
    # 1: every control character in a name; the one that used to inject a manifest entry first.
    c1 = run / "checkpoint_000001"
    c1.mkdir(parents=True)
    (c1 / "ok.bin").write_bytes(b"x" * 10)
    (c1 / "x\x0b..").mkdir()  # listed as "x\x0b../.bashrc\t5": split on \x0b, that was "../.bashrc"
    (c1 / "x\x0b.." / ".bashrc\t5").write_bytes(b"evil")
    for c in [*range(1, 32), 127]:
        (c1 / f"f{c:02x}-{chr(c)}-x").write_bytes(b"y")
    # 2: a directory whose name holds a newline and '..' parts.
    c2 = run / "checkpoint_000002" / "sub\n..\n.."
    c2.mkdir(parents=True)
    (c2 / "state.pt").write_bytes(b"z")
    # 3: links out of the folder: never followed, never copied.
    c3 = run / "checkpoint_000003"
    (c3 / "real").mkdir(parents=True)
    (c3 / "real" / "model.pt").write_bytes(b"m" * 100)
    (c3 / "passwd").symlink_to("/etc/passwd")
    (c3 / "home").symlink_to(testbed.home)
    # 4: a checkpoint that is a link to somewhere else, and one whose own name is hostile.
    (run / "checkpoint_000004").symlink_to("/etc")
    (run / "checkpoint_000005\x1b[31m").mkdir()
    (run / "checkpoint_000005\x1b[31m" / "f").write_text("f")
    for c in (c1, run / "checkpoint_000002", c3):
        mark_complete(c)  # as raybridge.train leaves a checkpoint: complete, the names aside
    testbed.give_tree(run)
    testbed.give_tree(area)
    prof = ["--profile", testbed.remote_profile]
    before = tree(area)

    def pull(name):
        return testbed.raybridge("laptop", "checkpoints", "pull", "hostile", str(dest), "--name", name, *prof)

    for name in ("checkpoint_000001", "checkpoint_000002"):
        msg = one_line(pull(name))
        assert f"hostile/{name} holds a file raybridge will not copy" in msg, msg
    assert tree(area) == before  # refused before anything was written, anywhere
    ok = pull("checkpoint_000003")
    assert ok.returncode == 0, ok.stderr
    got = dest / "checkpoint_000003"
    assert tree(got) == {
        "real",
        "real/model.pt",
        "state.pt",
        "raybridge-checkpoint.json",
    }  # no links followed
    assert not any(p.is_symlink() for p in got.rglob("*"))
    for name in ("checkpoint_000004", "checkpoint_000005\x1b[31m"):
        assert "has no checkpoint" in one_line(pull(name))
    ls = testbed.raybridge("laptop", "checkpoints", "ls", "hostile", *prof)
    assert ls.returncode == 0, ls.stderr
    rows = ls.stdout.splitlines()
    assert [line.split()[0] for line in rows] == [
        "checkpoint_000001",
        "checkpoint_000002",
        "checkpoint_000003",
    ]
    assert "33 file names raybridge will not copy" in rows[0] and "1 file names" in rows[1], rows
    pulled = {
        "dest/checkpoint_000003",
        "dest/checkpoint_000003/real",
        "dest/checkpoint_000003/real/model.pt",
        "dest/checkpoint_000003/state.pt",
        "dest/checkpoint_000003/raybridge-checkpoint.json",
    }
    assert tree(area) == before | pulled
    assert not (area / ".bashrc").exists()
    shutil.rmtree(run)
    shutil.rmtree(area)
