"""`raybridge serve` on the real test bed, as alice: a Ray Serve app (examples/serve_app.py, a small CPU
model built in place) kept serving across allocations with 3-minute time limits, through
`raybridge endpoint` on the login node, under a steady load across two handovers; and a generation that
cannot take over leaves the one before it serving, with one event saying why."""

import json
import re
import subprocess
import time

import pytest

from tests.cluster.bed import EXAMPLES, PYTHON, RAYBRIDGE, as_user, assert_no_leaks

pytestmark = pytest.mark.cluster
APP = str(EXAMPLES / "serve_app.py")

LOAD = r"""
import json, sys, time, urllib.request, urllib.error
url, token_path, history, handovers, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
token = open(token_path).read().strip()
rate, start, seen_at = 10.0, time.time(), None
while time.time() - start < limit:
    t0 = time.time()
    req = urllib.request.Request(url + "?x=0.1,0.2,0.3,0.4", headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
            ok = r.status == 200 and body.get("class") is not None
            status = r.status
    except Exception as e:
        ok, status = False, str(getattr(e, "code", e))[:100]
    print(json.dumps({"t": t0, "ms": (time.time() - t0) * 1000, "ok": ok, "status": status}), flush=True)
    if seen_at is None:
        try:
            events = [json.loads(line)["event"] for line in open(history)]
        except OSError:
            events = []
        if events.count("handover") >= handovers:
            seen_at = time.time()
    elif time.time() - seen_at > 8:
        break
    time.sleep(max(0.0, 1 / rate - (time.time() - t0)))
"""


PROBE = (
    "import sys, urllib.request; t = open(sys.argv[1]).read().strip(); "
    "r = urllib.request.urlopen(urllib.request.Request(sys.argv[2], headers={'Authorization': 'Bearer ' + t}), "
    "timeout=30); print(r.status)"
)


def serve(testbed, name: str, app: str = APP, profile: str | None = None) -> str:
    """`raybridge serve` in 3-minute generations (the next one after 1); generation 1's job id."""
    r = testbed.raybridge(
        "login", "serve", "--nodes", "1", "--time", "3", "--overlap", "2", "--name", name,
        "--profile", profile or testbed.local_profile, "--", "python", app, timeout=400,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return re.search(r"generation 1 \(job (\d+)\) serves", r.stdout).group(1)


def wait_event(testbed, name: str, event: str, timeout: float) -> dict:
    """The service's first history event of this kind, once it is there."""
    deadline = time.monotonic() + timeout
    while not (found := [e for e in history(testbed, name) if e["event"] == event]):
        assert time.monotonic() < deadline, history(testbed, name)
        time.sleep(0.5)
    return found[0]


def history(testbed, name: str) -> list[dict]:
    path = testbed.shared_dir / "serve" / name / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_endpoint(testbed, name: str, port: int) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        as_user("login", RAYBRIDGE, "endpoint", name, "--port", str(port), "--profile", testbed.local_profile),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = p.stderr.readline()
    assert f"http://127.0.0.1:{port}" in first, first + p.stderr.read()
    token_path = re.search(r"Bearer \$\(cat (.+)\)", p.stderr.readline()).group(1)
    return p, token_path


def stop_service(testbed, name: str) -> None:
    """down for the generation serving now and whatever is queued after it."""
    for event in reversed(history(testbed, name)):
        job = event.get("job_id")
        if job:
            testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)
    left = testbed.admin("login", "squeue", "-h", "-u", testbed.user, "-o", "%i", check=True).stdout.split()
    for job in left:
        testbed.raybridge("login", "down", job, "--profile", testbed.local_profile)


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def test_a_service_keeps_serving_across_two_handovers_with_no_failed_request(testbed):
    name = "classify"
    subprocess.run(["rm", "-rf", str(testbed.shared_dir / "serve" / name)], check=True)
    endpoint = None
    try:
        first = serve(testbed, name)
        endpoint, token_path = start_endpoint(testbed, name, 18080)
        load = testbed.write(f"{testbed.shared}/load.py", LOAD)
        hist = str(testbed.shared_dir / "serve" / name / "history.jsonl")
        r = testbed.exec(
            "login",
            PYTHON,
            load,
            "http://127.0.0.1:18080/classify",
            token_path,
            hist,
            "2",
            "420",
            timeout=480,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        samples = [json.loads(line) for line in r.stdout.splitlines()]
        events = history(testbed, name)
        handovers = [e for e in events if e["event"] == "handover"]
        assert len(handovers) >= 2, events
        assert [e["generation"] for e in handovers[:2]] == [2, 3]
        assert handovers[0]["previous"] == first
        failed = [s for s in samples if not s["ok"]]
        assert not failed, failed[:5]
        # Latency while a generation hands over (from 5 s before its takeover to 5 s after the old one's
        # grace) against the steady state.
        windows = [(e["at"] - 5, e["at"] + 8) for e in handovers]
        during = [s["ms"] for s in samples if any(a <= s["t"] <= b for a, b in windows)]
        steady = [s["ms"] for s in samples if not any(a - 20 <= s["t"] <= b + 20 for a, b in windows)]
        assert len(during) >= 50 and len(steady) >= 50, (len(during), len(steady))
        print(f"steady p99 {p99(steady):.1f} ms, handover p99 {p99(during):.1f} ms, {len(samples)} requests")
        assert p99(during) <= 2 * p99(steady), (p99(during), p99(steady))
        # The generations that handed over ended (drained), each with its request count.
        ended = {e["generation"]: e for e in events if e["event"] == "ended"}
        assert ended[1]["requests"] > 0 and ended[2]["requests"] > 0, events
        status = testbed.raybridge("login", "endpoint", name, "--status", "--profile", testbed.local_profile)
        assert status.stdout.count(" handover ") >= 2, status.stdout
    finally:
        if endpoint:
            endpoint.terminate()
            endpoint.wait(10)
        stop_service(testbed, name)
    for e in history(testbed, name):
        if e.get("job_id"):
            assert_no_leaks(e["job_id"], timeout=30)


def test_a_generation_that_fails_its_checks_leaves_the_one_before_serving(testbed):
    """The app of generation 2 cannot deploy (its file is gone when it starts): one event says so, and
    generation 1 still answers."""
    name = "fails"
    subprocess.run(["rm", "-rf", str(testbed.shared_dir / "serve" / name)], check=True)
    app = testbed.write(f"{testbed.shared}/serve_once.py", (EXAMPLES / "serve_app.py").read_text())
    try:
        first = serve(testbed, name, app=app)
        subprocess.run(["rm", "-f", app], check=True)  # generation 2 will not find it
        failed = wait_event(testbed, name, "generation_failed", 240)
        assert failed["generation"] == 2 and "exited with code" in failed["detail"], failed
        current = json.loads((testbed.shared_dir / "serve" / name / "current.json").read_text())
        assert current["generation"] == 1 and current["job_id"] == first
        # Generation 1 still serves, and nothing is queued after the failed one.
        endpoint, token_path = start_endpoint(testbed, name, 18081)
        try:
            probe = testbed.exec(
                "login", PYTHON, "-c",
                "import sys, urllib.request; t = open(sys.argv[1]).read().strip(); "
                "r = urllib.request.urlopen(urllib.request.Request(sys.argv[2], headers={'Authorization': 'Bearer ' + t}), timeout=30); "
                "print(r.status)",
                token_path, "http://127.0.0.1:18081/classify?x=1,2,3,4",
            )  # fmt: skip
            assert probe.stdout.strip() == "200", probe.stderr
        finally:
            endpoint.terminate()
            endpoint.wait(10)
    finally:
        stop_service(testbed, name)


REFUSING_SBATCH = """#!/bin/bash
# In the job only (the profile's setup puts it first on PATH): Slurm's own refusal for a next generation,
# as a site's submit limit gives it; any other submission goes to the real sbatch.
for a; do
  case $a in --dependency=after:*) echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)" >&2; exit 1 ;; esac
done
exec /usr/bin/sbatch "$@"
"""


def test_a_next_generation_slurm_refuses_is_one_event_and_the_service_goes_on(testbed):
    name = "refused"
    subprocess.run(["rm", "-rf", str(testbed.shared_dir / "serve" / name)], check=True)
    base = testbed.user_dir(f"{testbed.shared}/refusing-bin")
    testbed.write(base / "sbatch", REFUSING_SBATCH, mode=0o755)
    profile_text = (
        open(testbed.local_profile).read().replace("setup:\n", f"setup:\n  - export PATH={base}:$PATH\n", 1)
    )
    profile = testbed.write(f"{testbed.shared}/refusing.yaml", profile_text)
    try:
        serve(testbed, name, profile=profile)
        event = wait_event(testbed, name, "next_generation_refused", 60)
        assert event["generation"] == 1 and "Job violates accounting/QOS policy" in event["detail"], event
        status = testbed.raybridge("login", "endpoint", name, "--status", "--profile", profile)
        assert "next_generation_refused" in status.stdout, status.stdout
        current = json.loads((testbed.shared_dir / "serve" / name / "current.json").read_text())
        assert current["generation"] == 1
        # It still serves, here through an endpoint on the laptop (over SSH through the login node).
        laptop = subprocess.Popen(
            as_user("laptop", RAYBRIDGE, "endpoint", name, "--port", "18083", "--profile", testbed.remote_profile),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            first = laptop.stderr.readline()
            assert "http://127.0.0.1:18083" in first, first + laptop.stderr.read()
            token_path = re.search(r"Bearer \$\(cat (.+)\)", laptop.stderr.readline()).group(1)
            probe = testbed.exec(
                "laptop", PYTHON, "-c", PROBE, token_path, "http://127.0.0.1:18083/classify?x=1,2,3,4"
            )
            assert probe.stdout.strip() == "200", probe.stdout + probe.stderr
        finally:
            laptop.terminate()
            laptop.wait(10)
    finally:
        stop_service(testbed, name)
