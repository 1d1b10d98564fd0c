"""Scale-up benchmark: `raybridge scale --add 1` → the new node alive in the cluster, vs the same kind of
node in the cluster's initial bring-up (`up --nodes 2`: its worker node), median of several runs.

Run through scripts/bench-scale (it starts the test bed and runs this on the login node). Times come from
the records the agents write (a node's `joined_at`: its raylet registered with the GCS) and the moment the
benchmark asked (sbatch / `scale --add`); Slurm's own queue time (sacct Submit → Start, 1-s resolution)
is reported separately and taken out of the ratio.

Autoscaling: `up --nodes 1 --max-nodes 2`, then a driver in the allocation asks for more CPUs than the
head has; measured from the driver's request to the added node alive, split into Ray's autoscaler
deciding (its monitor looks every 5 s: AUTOSCALER_UPDATE_INTERVAL_S) and the member job's own start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime

import bench_report

from raybridge import jobdir as jd
from raybridge.client.profile import load_spec
from raybridge.client.submission import add_members, submit
from raybridge.transport.runner import LocalRunner


def queue_s(job_id: str) -> float:
    """Slurm's Submit → Start for a job (whole seconds)."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "Submit,Start"], capture_output=True, text=True
    )
    submit_at, start_at = out.stdout.strip().splitlines()[-1].split("|")
    return (datetime.fromisoformat(start_at) - datetime.fromisoformat(submit_at)).total_seconds()


def node_record(folder: jd.JobDir, key: str, timeout: float = 120) -> jd.NodeRecord:
    deadline = time.monotonic() + timeout
    while (rec := jd.read(folder.node(key), jd.NodeRecord)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"no node record {key} after {timeout}s")
        time.sleep(0.05)
    return rec


# More CPUs than the head has, until the test's end: the autoscaler must add a node.
DEMAND = """
import os, sys, time, ray
ray.init()
cpus = int(ray.cluster_resources()["CPU"])
@ray.remote(num_cpus=cpus)
def busy():
    time.sleep(600)
refs = [busy.remote() for _ in range(2)]
print("asked", time.time(), flush=True)
ray.get(refs)
"""


def one_autoscale_run(profile: str) -> dict[str, float]:
    runner = LocalRunner()
    spec = load_spec(profile, nodes=1, max_nodes=2, idle_timeout=300)
    c = submit(spec, runner)
    driver = None
    try:
        info = c.wait_ready(300)
        assert info.head is not None
        env = f"ALL,RAY_ADDRESS={info.address},RAY_AUTH_MODE=token,RAY_AUTH_TOKEN_PATH={c.dir.token}"
        driver = subprocess.Popen(
            ["srun", f"--jobid={c.job_id}", "--overlap", "-N1", "-n1", f"-w{info.head.hostname}",
             f"--export={env}", spec.python or sys.executable, "-c", DEMAND],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        line = driver.stdout.readline() if driver.stdout else ""
        if not line.startswith("asked "):
            raise SystemExit(f"the demand driver did not start: {line!r}")
        asked = float(line.split()[1])
        deadline = time.monotonic() + 180
        while not (ids := [r.job_id for r in c.members.records()]):
            if time.monotonic() > deadline:
                raise SystemExit("the autoscaler submitted no member job in 180 s")
            time.sleep(0.1)
        rec = jd.read(c.dir.member(ids[0]), jd.MemberRecord)
        node = node_record(c.dir, f"m{ids[0]}-0", timeout=180)
        total = (node.joined_at or 0) - asked
        decide = (rec.submitted_at or 0) - asked if rec else 0.0
        queue = queue_s(ids[0])
    finally:
        if driver:
            driver.kill()
        c.stop()
    return {
        "auto_total_s": total,
        "auto_decide_s": decide,
        "auto_queue_s": queue,
        "auto_start_s": total - decide - queue,
    }


def one_run(profile: str) -> dict[str, float]:
    runner = LocalRunner()
    spec = load_spec(profile, nodes=2)
    c = submit(spec, runner)
    try:
        info = c.wait_ready(300)
        worker = next(n for n in info.nodes if n.ip != (info.head.ip if info.head else None))
        initial_total = (worker.joined_at or 0) - (info.submitted_at or 0)
        initial_queue = queue_s(c.job_id)
        asked = time.time()
        (member,) = add_members(c, spec, 1)
        rec = node_record(c.dir, f"m{member}-0")
        member_total = (rec.joined_at or 0) - asked
        member_queue = queue_s(member)
    finally:
        c.stop()
    return {
        "initial_total_s": initial_total,
        "initial_queue_s": initial_queue,
        "initial_start_s": initial_total - initial_queue,
        "member_total_s": member_total,
        "member_queue_s": member_queue,
        "member_start_s": member_total - member_queue,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        rows.append(one_run(args.profile) | one_autoscale_run(args.profile))
        print(
            f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()),
            file=sys.stderr,
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"A node added to a running cluster vs the same node in the initial bring-up (median of {args.runs}, seconds)"
    )
    print(f"{'':36} | {'initial (up)':>12} | {'scale --add':>11} | {'autoscaler':>10}")
    print(
        f"{'asked → node alive':36} | {med['initial_total_s']:12.2f} | {med['member_total_s']:11.2f}"
        f" | {med['auto_total_s']:10.2f}"
    )
    print(f"{'  of which Ray autoscaler deciding':36} | {'':12} | {'':11} | {med['auto_decide_s']:10.2f}")
    print(
        f"{'  of which Slurm queue (sacct, 1 s)':36} | {med['initial_queue_s']:12.2f}"
        f" | {med['member_queue_s']:11.2f} | {med['auto_queue_s']:10.2f}"
    )
    print(
        f"{'  the node starting':36} | {med['initial_start_s']:12.2f} | {med['member_start_s']:11.2f}"
        f" | {med['auto_start_s']:10.2f}"
    )
    ratio = med["member_start_s"] / med["initial_start_s"]
    auto = med["auto_start_s"] / med["initial_start_s"]
    auto_all = (med["auto_start_s"] + med["auto_decide_s"]) / med["initial_start_s"]
    print(
        f"ratio, the node starting vs in the bring-up: scale --add {ratio:.2f}, autoscaler {auto:.2f}, "
        f"autoscaler with its deciding {auto_all:.2f} (goal ≤ 1.5)"
    )
    bench_report.save(
        "bench-scale",
        f"A node: initial bring-up vs scale --add vs the autoscaler (median of {args.runs})",
        "seconds (lower is better)",
        {
            "initial bring-up": {
                "asked → alive": med["initial_total_s"],
                "without queue": med["initial_start_s"],
            },
            "scale --add": {"asked → alive": med["member_total_s"], "without queue": med["member_start_s"]},
            "autoscaler": {
                "asked → alive": med["auto_total_s"],
                "without queue": med["auto_start_s"] + med["auto_decide_s"],
            },
        },
        {"runs": rows, "median": med},
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
