"""Bring-up benchmark: sbatch → cluster ready, raybridge vs two baselines, side by side.

Run through scripts/bench-bringup (it starts the test bed and runs this on the login node as the bed's
user alice).

Baselines, on the same cluster and the same nodes, in the same rounds:
  symmetric-run  `ray symmetric-run --address HEAD:6379 --min-nodes N` on every node (ships with Ray)
  ray-docs       the protocol of Ray's documented slurm-basic.sh: head via srun, sleep 10 s, then one
                 srun per worker with a 5 s sleep after each
The baselines' dashboards listen on every address (`--dashboard-host=0.0.0.0`; Ray's default is localhost)
so that the observer can see them answer. Like for like: every contender's clock starts just before `sbatch` and stops when one and the same observer
sees the cluster *ready* — all N nodes alive in the GCS, the head's dashboard (Jobs API) answering HTTP and its
Ray Client port accepting connections — which is what `ray start --head` gives before a driver runs and what
`raybridge up` waits for. The observer is a process on the login node, started (Ray imported) before the
clock, that polls every 50 ms as soon as the contender's head address is known; it also records when all N
nodes were alive. The order of the contenders rotates from round to round. What outlives a job is counted on
the compute nodes themselves: every process left in a node's network namespace (renamed Ray workers too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_report

from raybridge.client.profile import load_spec
from raybridge.client.submission import submit
from raybridge.transport.runner import LocalRunner

# argv: N; stdin: one line, "SINCE ADDRESS_FILE" (a JSON head record, or a plain host:port with Ray's
# default ports); a head record older than SINCE is a previous job's with the same id (ids restart).
OBSERVER = """
import ctypes, json, socket, sys, time, urllib.error, urllib.request
ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL when the benchmark goes
from ray._raylet import GcsClient
n = int(sys.argv[1])
print("armed", flush=True)
since, path = sys.stdin.readline().strip().split(" ", 1)
address = None
while address is None:
    try:
        text = open(path).read().strip()
    except OSError:
        text = ""
    if text and path.endswith(".json"):
        head = json.loads(text)
        if head.get("gcs_up_at", 0) < float(since):
            time.sleep(0.02)
            continue
        ip, ports = head["ip"], head["ports"]
        address, dashboard, ray_client = f"{ip}:{ports['gcs']}", ports["dashboard"], ports["client"]
    elif text:
        address, ip, dashboard, ray_client = text, text.split(":")[0], 8265, 10001
    time.sleep(0.02)


def answers(url):
    try:
        urllib.request.urlopen(url, timeout=1)
    except urllib.error.HTTPError:
        pass  # 401 without a token: the server is up
    except OSError:
        return False
    return True


def accepts(port):
    try:
        socket.create_connection((ip, port), timeout=1).close()
        return True
    except OSError:
        return False


gcs, alive_at = None, None
while True:
    if alive_at is None:
        try:
            gcs = gcs or GcsClient(address=address)
            if sum(1 for v in gcs.get_all_node_info(timeout=1).values() if v.state == 0) >= n:
                alive_at = time.time()
        except Exception:
            pass
    if alive_at is not None and answers(f"http://{ip}:{dashboard}/api/version") and accepts(ray_client):
        break
    time.sleep(0.05)
print(alive_at, time.time(), flush=True)
"""


class Observer:
    """The stopwatch every contender shares; start it before the clock (it imports Ray first)."""

    def __init__(self, n: int, token: Path | None = None):
        # Ray reads the token settings when it is imported: point them at a link made after submission.
        env = dict(os.environ)
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OBSERVER, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout.readline().strip() == "armed"

    def watch(self, address_file: Path, since: float) -> None:
        self.proc.stdin.write(f"{since} {address_file}\n")
        self.proc.stdin.flush()

    def times(self, timeout: float = 300) -> tuple[float, float]:
        """(all N nodes alive, ready) as machine-clock timestamps."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.proc.kill()
        alive, ready = out.split()
        return float(alive), float(ready)


SYMMETRIC = """#!/bin/bash
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --output={out}.log
{setup}
head_ip=$(getent hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" | awk '{{print $1}}')
echo "$head_ip:6379" > {out}.addr
srun --nodes={n} --ntasks-per-node=1 ray symmetric-run --address "$head_ip:6379" --min-nodes {n} \\
  --num-cpus=2 --object-store-memory=300000000 --dashboard-host=0.0.0.0 -- sleep 600
"""

RAY_DOCS = """#!/bin/bash
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --output={out}.log
{setup}
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${{nodes[0]}}
head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head" hostname --ip-address)
echo "$head_ip:6379" > {out}.addr
srun --overlap --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port=6379 \\
  --num-cpus=2 --object-store-memory=300000000 --dashboard-host=0.0.0.0 --block &
sleep 10
for ((i = 1; i < {n}; i++)); do
  srun --overlap --nodes=1 --ntasks=1 -w "${{nodes[$i]}}" ray start --address "$head_ip:6379" \\
    --num-cpus=2 --object-store-memory=300000000 --block &
  sleep 5
done
wait
"""


def wait_gone(job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not end")


BED_DAEMONS = {"slurmd", "slurmstepd", "sleep"}  # what the test bed itself runs on a compute node


def sweep() -> int:
    """Kill whatever outlived its job on the compute nodes and count it: every process in a compute
    node's network namespace except the bed's own daemons (Ray's renamed workers and agents too); as a
    user, that user's own processes there.
    The nodes' namespaces are found through their slurmd processes (the test bed shares one PID
    namespace)."""
    import psutil

    def netns(p: psutil.Process) -> str:
        try:
            return os.readlink(f"/proc/{p.pid}/ns/net") if p.status() != psutil.STATUS_ZOMBIE else ""
        except (OSError, psutil.Error):
            return ""

    procs = list(psutil.process_iter(["name", "uids"]))
    if os.geteuid() == 0:
        nodes = {netns(p) for p in procs if p.info["name"] == "slurmd"} - {""}
        stray = [p for p in procs if p.info["name"] not in BED_DAEMONS and netns(p) in nodes]
    else:
        # As the bed's user (who cannot see root's slurmd): that user's processes on any other host
        # than this login node (the benchmark runs nothing elsewhere).
        here = netns(psutil.Process())
        mine = [p for p in procs if p.info["uids"] and p.info["uids"].real == os.getuid()]
        stray = [p for p in mine if netns(p) not in ("", here)]
    for p in stray:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(stray, timeout=5)
    return len(stray)


def job_cpu(job_id: str) -> float:
    """CPU seconds used so far by the job's live processes: those with its SLURM_JOB_ID (the test bed
    shares one PID namespace) and all their descendants (Ray's agents retitle themselves, which hides
    their environment). Processes that already exited are not counted (e.g. a baseline's `ray start`
    before --block), so this can only undercount the baselines."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("SLURM_JOB_ID") == job_id:
                procs[p.pid] = p
                procs.update((c.pid, c) for c in p.children(recursive=True))
    total = 0.0
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def run_baseline(
    template: str, n: int, workdir: Path, setup: str, tag: str
) -> tuple[float, float, float, float]:
    """(all nodes alive, ready) in seconds after sbatch, CPU seconds the job had used when it was
    ready, and scancel → job gone."""
    out = workdir / f"{tag}-{n}-{time.time_ns()}"
    script = workdir / f"{tag}.sbatch"
    script.write_text(template.format(n=n, out=out, setup=setup))
    observer = Observer(n)
    t0 = time.time()
    observer.watch(Path(f"{out}.addr"), t0)
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
    job_id = job.stdout.strip().split(";")[0]
    try:
        alive, ready = observer.times()
        cpu = job_cpu(job_id)
    finally:
        t_stop = time.time()
        subprocess.run(["scancel", job_id], capture_output=True)
        wait_gone(job_id)
    return alive - t0, ready - t0, cpu, time.time() - t_stop


def run_raybridge(n: int, profile: str, workdir: Path) -> tuple[float, float, float, float]:
    """(all nodes alive, ready) in seconds after sbatch, the CPU seconds the job had used when it
    was ready, and `raybridge down` → job gone. The observer's ready, not the job's own record:
    the same clock as the baselines'."""
    spec = load_spec(profile, nodes=n, job_name="bench-raybridge")
    runner = LocalRunner()
    token_link = workdir / f"token-{time.time_ns()}"
    observer = Observer(n, token=token_link)
    t0 = time.time()
    cluster = submit(spec, runner)
    token_link.symlink_to(cluster.dir.token)
    observer.watch(Path(cluster.dir.head), t0)
    try:
        alive, ready = observer.times()
        cpu = job_cpu(cluster.job_id)
        cluster.wait_ready(timeout=300)  # what `raybridge up` returns on; stop only after it
    finally:
        t_stop = time.time()
        cluster.stop()
        wait_gone(cluster.job_id)
    return alive - t0, ready - t0, cpu, time.time() - t_stop


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--nodes", default="1,2,3,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-ray-docs", action="store_true", help="the documented protocol is slow by design")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    spec = load_spec(args.profile)
    setup = "\n".join(spec.setup)
    Path(spec.shared_dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=spec.shared_dir))
    counts = [int(x) for x in args.nodes.split(",")]
    names = ["raybridge", "symmetric-run"] + ([] if args.skip_ray_docs else ["ray-docs"])
    results: dict[str, dict[int, list[float]]] = {
        f"{m}:{x}": {n: [] for n in counts} for m in ("ready", "alive", "cpu", "stop") for x in names
    }
    leftovers = dict.fromkeys(names, 0)
    sweep()
    for r in range(args.runs):
        for i, n in enumerate(counts):
            k = (r * len(counts) + i) % len(names)  # rotate who goes first: drift hits all alike
            for name in names[k:] + names[:k]:
                if name == "raybridge":
                    alive, ready, cpu, stop = run_raybridge(n, args.profile, workdir)
                elif name == "symmetric-run":
                    alive, ready, cpu, stop = run_baseline(SYMMETRIC, n, workdir, setup, "symmetric")
                else:
                    alive, ready, cpu, stop = run_baseline(RAY_DOCS, n, workdir, setup, "raydocs")
                for m, v in (("ready", ready), ("alive", alive), ("cpu", cpu), ("stop", stop)):
                    results[f"{m}:{name}"][n].append(v)
                leftovers[name] += sweep()
                print(
                    f"round {r + 1}/{args.runs}  N={n}  {name:14} ready {ready:6.2f} s  alive {alive:6.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    med = {name: {n: statistics.median(v) for n, v in per.items()} for name, per in results.items()}
    print(
        f"Bring-up, sbatch → cluster ready (all N nodes alive, dashboard and Ray Client answering), "
        f"median of {args.runs} runs, seconds; ratio = raybridge / baseline"
    )
    others = names[1:]
    header = f"{'N':>2} | {'raybridge':>10} | " + " | ".join(f"{x:>13} | {'ratio':>6}" for x in others)
    print(header)
    print("-" * len(header))
    for n in counts:
        rb = med["ready:raybridge"][n]
        print(
            f"{n:>2} | {rb:10.2f} | "
            + " | ".join(f"{med[f'ready:{x}'][n]:13.2f} | {rb / med[f'ready:{x}'][n]:6.2f}" for x in others)
        )
    for key, title in (
        ("alive", "sbatch → all N nodes alive in the GCS (median seconds, same runs)"),
        (
            "cpu",
            "CPU seconds the job's processes had used when the cluster was ready (median; 2 shared cores)",
        ),
        (
            "stop",
            "Stop → job gone from the queue (median seconds; raybridge: `raybridge down`, baselines: scancel)",
        ),
    ):
        print(f"\n{title}\n N | " + " | ".join(f"{x:>13}" for x in names))
        for n in counts:
            print(f"{n:>2} | " + " | ".join(f"{med[f'{key}:{x}'][n]:13.2f}" for x in names))
    first, last = med["ready:raybridge"][counts[0]], med["ready:raybridge"][counts[-1]]
    print(
        "\nProcesses left on the compute nodes after the job ended (all runs, killed by the benchmark): "
        + ", ".join(f"{k} {v}" for k, v in leftovers.items())
    )
    print(f"raybridge scaling (ready): {counts[-1]} nodes / {counts[0]} node = {last / first:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "median": med}, indent=2))
    bench_report.save(
        "bench-bringup",
        f"sbatch → Ray cluster ready (median of {args.runs}; {os.cpu_count()} cores shared by all nodes)",
        "seconds (lower is better)",
        {x: {f"N={n}": med[f"ready:{x}"][n] for n in counts} for x in names},
        {"runs": results, "median": med, "leftovers": leftovers},
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
