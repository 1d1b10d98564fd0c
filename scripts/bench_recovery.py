"""Recovery after a failure mid-training (3 nodes, checkpoint every `every` steps), three cases:
  raylet      kill -9 of the raylet on a worker node (neither the batch host nor the head; 3 workers)
  head        crash of the head node: Slurm marks it down, every process of the job on it is killed;
              another agent takes over as head and the driver starts again (2 workers)
  requeue     crash of the batch host (n1) with --requeue: Slurm requeues the job, `raybridge run`
              lets it start at once; Slurm's own hold is reported separately (2 workers)
and measure kill → new training loop started, → checkpoint loaded, → first completed step after the
restore (the headline), and the work redone. Runs on the test-bed host as root (scripts/bench-recovery):
it needs to reach into a node's processes; the job itself runs as the bed's user (--user).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import bench_report
import psutil
from bench_common import REPO, events, high_water, result

TESTBED = str(REPO / "scripts/testbed")
RAYBRIDGE = "/srv/rbtb/opt/venv/bin/raybridge"  # the users' install on the bed


def cluster(shared: str, job: str) -> dict:
    return json.loads((Path(shared) / "jobs" / job / "cluster.json").read_text())


def kept_lines(paths) -> Iterator[str]:
    """The lines of Ray logs kept in a job folder (compressed or not)."""
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", errors="replace") as f:
            yield from f


def node_dead_at(shared: str, job: str, head: str) -> float:
    """When the GCS on the head declared the killed node dead, from its log (kept in the job folder)."""
    for line in kept_lines((Path(shared) / "jobs" / job / "logs" / "ray" / head).glob("gcs_server.out*")):
        if "Node is dead because the health check failed" in line:
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", line)
            if stamp:  # the test bed's nodes share this machine's clock and time zone
                return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return float("nan")


TRAIN_PHASES = (
    ("[FailurePolicy] RETRY", "train_failure_seen_s"),
    ("Placement group ready", "train_placement_s"),
    ("worker actors created", "train_actors_s"),
    ("Train context initialized", "train_context_s"),
    ("Worker group startup completed", "train_group_started_s"),
)


def train_trace(shared: str, job: str, t_kill: float) -> dict[str, float]:
    """Ray Train's controller's own log (kept in the job folder): when it saw the failure and how long
    each step of the new worker group took, as seconds after the kill."""
    out: dict[str, float] = {}
    logs = (Path(shared) / "jobs" / job / "logs" / "ray").glob("*/train/ray-train-sys-controller-*")
    for line in kept_lines(logs):
        with contextlib.suppress(ValueError, KeyError):
            rec = json.loads(line)
            at = datetime.strptime(rec["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for needle, key in TRAIN_PHASES:
                if at >= t_kill and needle in rec["message"] and key not in out:
                    out[key] = at - t_kill
    return out


def in_node(node: str, job: str, names: tuple[str, ...] | None = None) -> list[psutil.Process]:
    """This job's processes in one node's namespace (or those with the given names)."""
    out = []
    for pid in subprocess.run(
        ["ip", "netns", "pids", f"rbtb-{node}"], capture_output=True, text=True
    ).stdout.split():
        try:
            p = psutil.Process(int(pid))
            env = p.environ()
            if (env.get("SLURM_JOB_ID") == job or env.get("RAYBRIDGE_JOB_ID") == job) and (
                names is None or p.name() in names
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


SETTLE_S = 60.0


def settled(log: Path, nodes: int) -> bool:
    """Every node keeps its warm worker process and the standby driver (the next node in line for the
    head) has its imports done: what the job log says once the cluster runs the training."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count("warm workers: keeping") >= nodes and (nodes < 2 or "standing by on" in text)


def one_run(args: argparse.Namespace, case: str) -> dict:
    profile, shared, steps, every = args.profile, args.shared, args.steps, args.every
    workers = "3" if case == "raylet" else "2"
    nodes = "3" if case != "requeue" else "2"
    argv = [RAYBRIDGE, "run", "--nodes", nodes, "--profile", profile]
    argv += ["--requeue"] if case == "requeue" else []
    argv += ["--", "python", args.example, "--steps", str(steps), "--every", str(every)]
    argv += ["--workers", workers, "--step-sleep", "0.05"]
    p = subprocess.Popen(
        [TESTBED, "exec", "--user", args.user, "login", "--", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job = None
    while job is None:
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            raise RuntimeError("raybridge run ended before it submitted:\n" + p.stderr.read()[-3000:])
        m = re.search(r"submitted job (\d+)", line)
        job = m.group(1) if m else None
    run = Path(shared) / "runs" / f"raybridge-{job}"
    # A settled job, as most failures meet one: the training past its first checkpoint, every node's warm
    # worker process kept and the standby driver's imports done; then the kill half-way between two
    # checkpoints (the same work redone in every run).
    log = Path(shared) / "logs" / f"raybridge-{job}.out"
    settled_by = time.monotonic() + SETTLE_S
    while high_water(run) < every or (time.monotonic() < settled_by and not settled(log, int(nodes))):
        if p.poll() is not None:
            raise RuntimeError(f"job {job} ended before the kill:\n" + p.stderr.read()[-3000:])
        time.sleep(0.1)
    kill_at = (high_water(run) // every + 1) * every - every // 2
    kill_at += every if kill_at <= high_water(run) else 0
    while high_water(run) < kill_at:
        if p.poll() is not None:
            raise RuntimeError(f"job {job} ended before the kill:\n" + p.stderr.read()[-3000:])
        time.sleep(0.05)
    head = cluster(shared, job)["head"]["hostname"]
    victim = {"raylet": ({"n1", "n2", "n3"} - {"n1", head}).pop(), "head": head, "requeue": "n1"}[case]
    lost_at = high_water(run)
    if case == "raylet":
        t_kill = time.time()
        for r in in_node(victim, job, ("raylet",)):
            r.kill()
    else:
        t_kill = time.time()  # what a crash is: slurmd and every process of the node SIGKILLed, node down
        subprocess.run([TESTBED, "crash", victim], check=True, capture_output=True)
    try:
        while not any(e["event"] == "loop_start" and e["t"] > t_kill for e in events(run)):
            if p.poll() is not None:
                raise RuntimeError(
                    f"job {job} ended without restarting the training:\n" + p.stderr.read()[-3000:]
                )
            time.sleep(0.1)
        out, err = p.communicate(timeout=600)
    finally:
        if case != "raylet":
            subprocess.run([TESTBED, "revive", victim], capture_output=True)
    res = result(out)
    info = cluster(shared, job)
    ev = [e for e in events(run) if e["t"] > t_kill]
    start = next(e["t"] for e in ev if e["event"] == "loop_start")
    restored = next(e for e in ev if e["event"] == "restored")
    first = next(e["t"] for e in ev if e["event"] == "first_step")
    row = {
        "detect_and_restart_s": start - t_kill,
        "checkpoint_load_s": restored["t"] - start,
        "first_step_s": first - restored["t"],
        "total_s": first - t_kill,
        "redone_steps": lost_at - restored["step"],
        "final_step": res["final_step"],
    }
    row |= train_trace(shared, job, t_kill)
    if case == "raylet":
        row["node_dead_s"] = node_dead_at(shared, job, head) - t_kill
    elif case == "head":
        at = {e["event"]: e["at"] for e in info["events"]}
        row["head_lost_s"] = at["head_lost"] - t_kill
        row["new_head_ready_s"] = at["head_replaced"] - t_kill
    else:
        row["job_running_again_s"] = info["started_at"] - t_kill
        # What Slurm would have held it for (`raybridge run` moved the begin time to now).
        m = re.search(r"requeued and held until (\S+) for", err)
        held = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp() if m else float("nan")
        row["slurm_hold_s"] = held - t_kill
    return row


LABELS = {
    "raylet": "kill -9 of a worker node's raylet (3 nodes, 3 training workers)",
    "head": "crash of the head node (Slurm down + SIGKILL of the job's processes; 3 nodes, 2 workers)",
    "requeue": "crash of the batch host with --requeue (2 nodes, 2 workers)",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=40)
    ap.add_argument("--cases", default="raylet,head,requeue")
    ap.add_argument("--example", required=True, help="examples/train_mlp.py where the user can read it")
    ap.add_argument("--user", required=True, help="the bed's user the job runs as")
    args = ap.parse_args()
    table: dict[str, dict[str, float]] = {}
    raw: dict[str, list] = {}
    for case in args.cases.split(","):
        rows = []
        for i in range(args.runs):
            rows.append(one_run(args, case))
            print(
                f"{case} run {i + 1}/{args.runs}: "
                + ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()
                ),
                file=sys.stderr,
                flush=True,
            )
        med = {k: statistics.median(r[k] for r in rows if k in r) for k in {k for r in rows for k in r}}
        print(f"Recovery from {LABELS[case]}, median of {args.runs}")
        for key, label in (
            ("node_dead_s", "node declared dead by the GCS"),
            ("train_failure_seen_s", "Ray Train acts on the failure"),
            ("train_placement_s", "  new worker group: resources placed"),
            ("train_actors_s", "  worker processes started"),
            ("train_context_s", "  training context (torch, process group)"),
            ("train_group_started_s", "  worker group started"),
            ("head_lost_s", "head declared lost by the agents"),
            ("new_head_ready_s", "new head ready, all nodes rejoined"),
            ("job_running_again_s", "requeued job running again"),
            ("detect_and_restart_s", "new training loop started"),
            ("checkpoint_load_s", "checkpoint loaded (after loop start)"),
            ("first_step_s", "first step completed (after load)"),
            ("total_s", "failure → first completed step"),
        ):
            if key in med:
                print(f"  {label:42} {med[key]:6.1f} s")
        if "slurm_hold_s" in med:
            print(f"  {'Slurm would have held it until (skipped)':42} {med['slurm_hold_s']:6.1f} s")
        print(f"  {f'steps redone (checkpoint every {args.every})':42} {med['redone_steps']:6.0f}")
        print(f"  {'final step':42} {med['final_step']:6.0f} of {args.steps}\n")
        table.setdefault("failure → first completed step", {})[case] = med["total_s"]
        raw[case] = rows
    bench_report.save(
        "bench-recovery",
        f"Recovery: failure → first completed training step (median of {args.runs})",
        "seconds (lower is better)",
        table,
        raw,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
