"""Helpers for tests against the real test bed (scripts/testbed): a multi-node Slurm cluster,
a login node with sshd and a laptop, each in its own network namespace.

raybridge runs as a normal user (alice, unless a test says otherwise), from the users' venv on
shared storage, as on a real site; root only administers the bed (crashes, node states, cleanup)."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TESTBED = str(REPO / "scripts" / "testbed")
ROOT = Path(os.environ.get("RBTB_ROOT", "/srv/rbtb"))
VENV = ROOT / "opt" / "venv"  # the users' venv (scripts/testbed builds it)
RAYBRIDGE = str(VENV / "bin" / "raybridge")
PYTHON = str(VENV / "bin" / "python")
USER = "alice"  # who runs raybridge in the tests
# The examples, copied where the user can read them (the checkout may be in a private folder).
EXAMPLES = ROOT / "shared" / f"work-{USER}" / "examples"


HTTP_PROBE = """
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + open(sys.argv[2]).read().strip())
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError as e:
    print("ERR", getattr(e, "reason", e))
"""


class Testbed:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.user = env["RAYBRIDGE_TESTBED_USER"]
        self.home = Path(env["RAYBRIDGE_TESTBED_HOME"])
        self.uid = pwd.getpwnam(self.user).pw_uid
        self.local_profile = env["RAYBRIDGE_TESTBED_LOCAL_PROFILE"]
        self.remote_profile = env["RAYBRIDGE_TESTBED_REMOTE_PROFILE"]
        self.nodes = int(env["RAYBRIDGE_TESTBED_NODES"])
        # raybridge's shared_dir in the user's profiles, and a folder of the user's on shared storage
        # for the files a test makes (profiles, scripts, known_hosts).
        self.shared_dir = Path(profile_value(self.local_profile, "shared_dir"))
        self.shared = f"{env['RAYBRIDGE_TESTBED_SHARED']}/work-{self.user}"
        if not os.path.isdir(self.shared):
            os.mkdir(self.shared)
        self.give(self.shared, 0o755)
        # What tests run from the checkout, copied where the user can read it: the examples, and
        # raybridge's sources alone (for a Python that has none of its dependencies).
        shutil.copytree(REPO / "examples", f"{self.shared}/examples", dirs_exist_ok=True)
        self.sources = f"{self.shared}/src"
        shutil.rmtree(self.sources, ignore_errors=True)
        shutil.copytree(
            REPO / "raybridge",
            f"{self.sources}/raybridge",
            symlinks=False,
            ignore=shutil.ignore_patterns("__pycache__"),
        )

    def give(self, path: str | Path, mode: int | None = None) -> None:
        """Make a file the test wrote (as root) the user's own, as if the user had written it."""
        pw = pwd.getpwnam(self.user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        if mode is not None:
            os.chmod(path, mode)

    def give_tree(self, path: str | Path) -> None:
        """give() for a folder the test made and everything in it (links themselves, not their targets)."""
        pw = pwd.getpwnam(self.user)
        for folder, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(folder, name), pw.pw_uid, pw.pw_gid)
        os.lchown(path, pw.pw_uid, pw.pw_gid)

    def user_dir(self, path: str | Path) -> Path:
        """mkdir -p as the user (so the folders are the user's, as raybridge requires)."""
        self.exec("login", "mkdir", "-p", "--", str(path), check=True)
        return Path(path)

    def write(self, path: str | Path, text: str, mode: int = 0o644) -> str:
        """Write a file as the user would (the user's own, mode 0644 unless said); returns its path."""
        Path(path).write_text(text)
        self.give(path, mode)
        return str(path)

    def exec(
        self,
        host: str,
        *cmd: str,
        timeout: float = 300,
        input: str | None = None,
        check: bool = False,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """cmd on host as the test's user (or `user`; "root" for the bed's administration)."""
        r = subprocess.run(
            as_user(host, *cmd, user=user or self.user),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{shlex.join(cmd)} on {host} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
            )
        return r

    def admin(self, host: str, *cmd: str, **kw) -> subprocess.CompletedProcess[str]:
        """cmd on host as root: the bed's administrator, never raybridge's user."""
        return self.exec(host, *cmd, user="root", **kw)

    def raybridge(
        self, host: str, *args: str, timeout: float = 300, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.exec(host, RAYBRIDGE, *args, timeout=timeout, user=user)

    def start_raybridge(self, host: str, *args: str, output: bool = True) -> subprocess.Popen[str]:
        """raybridge on host in the background (text pipes, or output discarded)."""
        pipe = subprocess.PIPE if output else subprocess.DEVNULL
        return subprocess.Popen(
            as_user(host, RAYBRIDGE, *args, user=self.user), stdout=pipe, stderr=pipe, text=True
        )

    def http(self, host: str, url: str, token_path: str | None = None) -> str:
        """GET url from host (optionally with the bearer token in token_path): status code or ERR reason."""
        args = [url] + ([token_path] if token_path else [])
        return self.exec(host, PYTHON, "-c", HTTP_PROBE, *args, check=True).stdout.strip()

    def squeue_ids(self) -> list[str]:
        return self.admin("login", "squeue", "-h", "-o", "%i", check=True).stdout.split()

    def job_dir(self, job_id: str) -> Path:
        return self.shared_dir / "jobs" / job_id

    def cluster_json(self, job_id: str) -> dict:
        return json.loads((self.job_dir(job_id) / "cluster.json").read_text())

    def wait_job_gone(self, job_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while job_id in self.squeue_ids():
            assert time.monotonic() < deadline, f"job {job_id} still in the queue"
            time.sleep(0.5)


def as_user(host: str, *cmd: str, user: str = USER) -> list[str]:
    """The argv that runs cmd on host as user ("root": as the bed's administrator)."""
    return [TESTBED, "exec", "--user", user, host, "--", *cmd]


def profile_value(profile: str, key: str) -> str:
    """A top-level key of a profile the bed wrote (plain `key: value` lines)."""
    for line in Path(profile).read_text().splitlines():
        if line.startswith(f"{key}: "):
            return line.split(": ", 1)[1].strip()
    raise KeyError(f"{key} not in {profile}")


def job_procs(job_id: str) -> list[psutil.Process]:
    """Processes anywhere on the machine that carry this raybridge job's marker in their environment.
    Ray's workers and agents retitle themselves and their environment reads empty: `leaks` finds those."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAYBRIDGE_JOB_ID") == job_id:
                found.append(p)
        except psutil.Error:
            continue
    return found


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid}:{p.name()} {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"{p.pid}:?"


def job_processes(job_id: str) -> list[str]:
    """The marked processes, as "pid:name command line" (what a failure needs to say)."""
    return [describe(p) for p in job_procs(job_id)]


# What the test bed itself runs inside a compute node's namespaces.
BED_DAEMONS = {"slurmd", "slurmstepd", "sleep"}


def owner(p: psutil.Process) -> str | None:
    """The Slurm job a process belongs to: its own job marker, else its nearest ancestor's (a
    retitled Ray process has no readable environment, its raylet or agent has). None: an orphan."""
    while p is not None and p.pid > 1:
        try:
            env = p.environ()
            job = env.get("RAYBRIDGE_JOB_ID") or env.get("SLURM_JOB_ID")
            if job:
                return job
            p = p.parent()
        except psutil.Error:
            return None
    return None


def node_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(
        name
        for line in out.splitlines()
        if (name := line.split()[0]).startswith("rbtb-n") and name[6:].isdigit()
    )


def processes_in(namespace: str) -> list[psutil.Process]:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(int(pid))
            if p.status() != psutil.STATUS_ZOMBIE:  # exited; collecting it is its parent's business
                procs.append(p)
        except psutil.Error:
            continue
    return procs


def leaks(job_id: str) -> list[str]:
    """Everything of this job still running: processes with its marker anywhere, and on every
    compute node any process (renamed or not) that belongs to this job or to no job at all — an
    orphaned `ray::IDLE` worker or raylet left behind counts, whichever job left it."""
    found = {p.pid: describe(p) for p in job_procs(job_id)}
    for ns in node_namespaces():
        for p in processes_in(ns):
            try:
                if p.name() in BED_DAEMONS:
                    continue
            except psutil.Error:
                continue
            if owner(p) in (job_id, None):
                found[p.pid] = f"{ns[5:]}/{describe(p)}"
    return sorted(found.values())


def assert_no_leaks(job_id: str, timeout: float = 10) -> None:
    """Nothing of the job runs any more (a few seconds for processes that are exiting)."""
    deadline = time.monotonic() + timeout
    while left := leaks(job_id):
        assert time.monotonic() < deadline, f"job {job_id} left processes behind: {left}"
        time.sleep(0.2)


def all_job_ids(bed: Testbed) -> list[int]:
    """Every job Slurm's accounting knows of (the database is fresh at each `testbed up`)."""
    out = bed.admin(
        "login", "sacct", "-a", "-X", "-n", "-P", "-o", "JobIDRaw", "-S", "2000-01-01", check=True
    )
    return sorted({int(x) for x in out.stdout.split() if x.isdigit()})


USERS = ("alice", "bob", "carol")


def user_processes() -> list[str]:
    """Processes of the bed's users on any of its hosts (laptop and login included: tunnels, CLIs)."""
    uids = {pwd.getpwnam(u).pw_uid: u for u in USERS}
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = []
    for ns in sorted(line.split()[0] for line in out.splitlines() if line.startswith("rbtb-")):
        for p in processes_in(ns):
            try:
                if p.uids().real in uids:
                    found.append(f"{ns[5:]}/{uids[p.uids().real]}/{describe(p)}")
            except psutil.Error:
                continue
    return found
