"""A service across allocations (`raybridge serve`), measured from a client: a steady 10 requests/s through
`raybridge endpoint` across two handovers. Prints failed requests, p50/p99 in the steady state and during
the handovers (5 s before a takeover to 8 s after: the old generation's grace and drain), and the longest
time without a successful response.

Runs as the test bed's user (scripts/bench-serve starts it).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import bench_report

RAYBRIDGE = "/srv/rbtb/opt/venv/bin/raybridge"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--shared", required=True, help="the profile's shared_dir")
    ap.add_argument("--app", required=True)
    ap.add_argument("--handovers", type=int, default=2)
    ap.add_argument("--port", type=int, default=18090)
    args = ap.parse_args()
    name = f"bench-{int(time.time())}"
    r = subprocess.run(
        [RAYBRIDGE, "serve", "--nodes", "1", "--time", "3", "--overlap", "2", "--name", name,
         "--profile", args.profile, "--", "python", args.app],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    endpoint = subprocess.Popen(
        [RAYBRIDGE, "endpoint", name, "--port", str(args.port), "--profile", args.profile],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    endpoint.stderr.readline()
    token_path = re.search(r"Bearer \$\(cat (.+)\)", endpoint.stderr.readline()).group(1)
    token = Path(token_path).read_text().strip()
    history = Path(args.shared) / "serve" / name / "history.jsonl"
    samples, seen_at = [], None
    url = f"http://127.0.0.1:{args.port}/classify?x=0.1,0.2,0.3,0.4"
    try:
        while seen_at is None or time.time() - seen_at < 10:
            t0 = time.time()
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    ok = resp.status == 200 and json.loads(resp.read()).get("class") is not None
            except (urllib.error.URLError, OSError, ValueError):
                ok = False
            samples.append({"t": t0, "done": time.time(), "ms": (time.time() - t0) * 1000, "ok": ok})
            events = (
                [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
            )
            if seen_at is None and sum(e["event"] == "handover" for e in events) >= args.handovers:
                seen_at = time.time()
            time.sleep(max(0.0, 0.1 - (time.time() - t0)))
    finally:
        endpoint.terminate()
        events = [json.loads(line) for line in history.read_text().splitlines()]
        for e in events:
            if e.get("job_id"):
                subprocess.run(
                    [RAYBRIDGE, "down", e["job_id"], "--profile", args.profile], capture_output=True
                )
        for job in subprocess.run(
            ["squeue", "-h", "--me", "-o", "%i"], capture_output=True, text=True
        ).stdout.split():
            subprocess.run([RAYBRIDGE, "down", job, "--profile", args.profile], capture_output=True)
    handovers = [e["at"] for e in events if e["event"] == "handover"]
    windows = [(at - 5, at + 8) for at in handovers]
    during = [s["ms"] for s in samples if any(a <= s["t"] <= b for a, b in windows)]
    steady = [s["ms"] for s in samples if not any(a - 20 <= s["t"] <= b + 20 for a, b in windows)]
    good = [s["done"] for s in samples if s["ok"]]
    gap = max((b - a for a, b in zip(good, good[1:], strict=False)), default=float("nan"))
    failed = sum(not s["ok"] for s in samples)
    print(f"Serving across allocations: 10 requests/s through raybridge endpoint, {len(handovers)} handovers")
    print(f"  requests {len(samples)}, failed {failed}")
    print(
        f"  steady     p50 {statistics.median(steady):6.1f} ms   p99 {pct(steady, 0.99):6.1f} ms  ({len(steady)} requests)"
    )
    print(
        f"  handover   p50 {statistics.median(during):6.1f} ms   p99 {pct(during, 0.99):6.1f} ms  ({len(during)} requests)"
    )
    print(f"  p99 handover / steady {pct(during, 0.99) / pct(steady, 0.99):.2f} (goal <= 2)")
    print(f"  longest time without a successful response {gap:.2f} s (requests every 0.1 s)")
    bench_report.save(
        "bench-serve",
        "Serving across allocations: latency steady vs during handover",
        "milliseconds",
        {"steady": {"p50": statistics.median(steady), "p99": pct(steady, 0.99)},
         "handover": {"p50": statistics.median(during), "p99": pct(during, 0.99)}},
        {"failed": failed, "requests": len(samples), "longest_gap_s": gap, "events": events},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
