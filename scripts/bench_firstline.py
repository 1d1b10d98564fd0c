"""What the user waits for: submit → the program's first line on the user's terminal.

Run through scripts/bench-firstline (it starts the test bed). The program is the same file for every
contender: `import ray; ray.init(); print(...)` once it sees N alive nodes (flushed, so that Python's
block buffering of a file is no one's handicap). The clock starts just before the user's command and
stops when the line appears in what the user reads:

  raybridge          `raybridge run --nodes N -- python first.py` on the login node, its stdout
  raybridge-laptop   the same from the laptop over SSH (remote profile)
  symmetric-run      `sbatch` of `ray symmetric-run --min-nodes N -- python first.py` on the login node,
                     followed with `tail -F` (inotify: the fastest follower there is)
  symmetric-laptop   the same from the laptop with OpenSSH: `ssh login sbatch ...`, `ssh login tail -F`
  ray-docs           Ray's documented slurm-basic.sh protocol (head, sleep 10, a worker every 5 s),
                     then `python first.py` in the batch script; `tail -F` on the login node

Every contender runs as the bed's user (--user, alice from scripts/bench-firstline), as users run;
the benchmark itself runs as root (it sweeps the compute nodes between jobs).
Nodes are idle before every run (the previous job is gone from the queue); the order of the contenders
rotates from round to round; processes left on the compute nodes are counted after each job.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
from bench_bringup import sweep  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TESTBED = str(REPO / "scripts/testbed")
USER = "alice"  # set by main() from --user
MARK = "FIRST-LINE"

PROGRAM = f"""import sys
import ray
ray.init()
print("{MARK}", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
"""

SYMMETRIC = """#!/bin/bash
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --output={log}
{setup}
head_ip=$(getent hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" | awk '{{print $1}}')
srun --nodes={n} --ntasks-per-node=1 ray symmetric-run --address "$head_ip:6379" --min-nodes {n} \\
  --num-cpus=2 --object-store-memory=300000000 -- python {program}
"""

RAY_DOCS = """#!/bin/bash
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --output={log}
{setup}
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${{nodes[0]}}
head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head" hostname --ip-address)
srun --overlap --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port=6379 \\
  --num-cpus=2 --object-store-memory=300000000 --block &
sleep 10
for ((i = 1; i < {n}; i++)); do
  srun --overlap --nodes=1 --ntasks=1 -w "${{nodes[$i]}}" ray start --address "$head_ip:6379" \\
    --num-cpus=2 --object-store-memory=300000000 --block &
  sleep 5
done
RAY_ADDRESS="$head_ip:6379" python {program}
"""


def on(host: str, *argv: str) -> list[str]:
    return [TESTBED, "exec", "--user", USER, host, "--", *argv]


def until_line(argv: list[str], t0: float, timeout: float = 180) -> float:
    """Start argv; seconds from t0 until its stdout shows the program's line. The process is left
    running (returned through the Popen's caller-visible attribute)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    until_line.proc = p  # type: ignore[attr-defined]
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if MARK.encode() in buf:
                return time.time() - t0
    p.kill()
    raise RuntimeError(f"no {MARK} line from {argv[:6]}...: {buf[-2000:].decode(errors='replace')}")


def squeue_empty() -> bool:
    out = subprocess.run(on("login", "squeue", "-h"), capture_output=True, text=True).stdout
    return not out.strip()


def wait_idle(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not squeue_empty():
        if time.monotonic() > deadline:
            raise TimeoutError("the queue did not empty")
        time.sleep(0.2)


def raybridge(rb: str, n: int, profile: str, program: str, host: str) -> float:
    argv = on(host, rb, "run", "--nodes", str(n), "--profile", profile, "--", "python", program)
    t0 = time.time()
    took = until_line(argv, t0)
    p = until_line.proc  # type: ignore[attr-defined]
    if p.wait(timeout=120) != 0:
        raise RuntimeError(f"raybridge run exited with {p.returncode}")
    return took


def baseline(template: str, n: int, workdir: Path, setup: str, program: str, ssh: list[str] | None) -> float:
    log = workdir / f"baseline-{time.time_ns()}.log"
    script = workdir / f"baseline-{time.time_ns()}.sbatch"
    script.write_text(template.format(n=n, log=log, setup=setup, program=program))
    shutil.chown(script, USER, USER)
    follow = f"j=$(sbatch --parsable {script}) && echo $j > {log}.id && exec tail -n +1 -F {log} 2>/dev/null"
    if ssh is None:
        argv = on("login", "bash", "-c", follow)
    else:
        # The laptop: one ssh to submit, one to follow, as a user would type them.
        sub = f"sbatch --parsable {script} > {log}.id"
        argv = on(
            "laptop",
            "bash",
            "-c",
            f"{' '.join(ssh)} login '{sub}' && exec {' '.join(ssh)} login 'tail -n +1 -F {log}'",
        )
    t0 = time.time()
    try:
        took = until_line(argv, t0)
    finally:
        until_line.proc.kill()  # type: ignore[attr-defined]
        for _ in range(50):
            if Path(f"{log}.id").exists() and Path(f"{log}.id").read_text().strip():
                break
            time.sleep(0.1)
        job = Path(f"{log}.id").read_text().strip().split(";")[0]
        subprocess.run(on("login", "scancel", job), capture_output=True)
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local-profile", required=True)
    ap.add_argument("--remote-profile", required=True)
    ap.add_argument("--ssh-config", required=True)
    ap.add_argument("--shared", required=True, help="a folder of the user's own on shared storage")
    ap.add_argument("--user", required=True, help="the bed's user every contender runs as")
    ap.add_argument("--venv", required=True, help="the users' venv (raybridge and Ray)")
    ap.add_argument("--nodes", default="1,2,3,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", help="comma-separated contenders")
    ap.add_argument("--skip-ray-docs", action="store_true")
    ap.add_argument("--json", type=Path, help="raw results go to <stem>-firstline.json next to it")
    args = ap.parse_args()
    global USER
    USER = args.user
    rb = f"{args.venv}/bin/raybridge"
    # The profile's setup lines, read by the user (raybridge trusts a profile only for its owner).
    read = "import sys; from raybridge.client.profile import load_spec; print('\\n'.join(load_spec(sys.argv[1]).setup))"
    got = subprocess.run(
        on("login", f"{args.venv}/bin/python", "-c", read, args.local_profile), capture_output=True, text=True
    )
    if got.returncode:
        raise SystemExit(f"reading {args.local_profile} as {USER}: {got.stderr.strip()}")
    setup = got.stdout.rstrip("\n")
    workdir = Path(args.shared)
    program = str(workdir / "first.py")
    Path(program).write_text(PROGRAM)
    shutil.chown(program, USER, USER)
    ssh = ["ssh", "-F", args.ssh_config, "-o", "BatchMode=yes"]
    contenders = {
        "raybridge": lambda n: raybridge(rb, n, args.local_profile, program, "login"),
        "raybridge-laptop": lambda n: raybridge(rb, n, args.remote_profile, program, "laptop"),
        "symmetric-run": lambda n: baseline(SYMMETRIC, n, workdir, setup, program, None),
        "symmetric-laptop": lambda n: baseline(SYMMETRIC, n, workdir, setup, program, ssh),
        "ray-docs": lambda n: baseline(RAY_DOCS, n, workdir, setup, program, None),
    }
    names = args.only.split(",") if args.only else list(contenders)
    if args.skip_ray_docs and "ray-docs" in names:
        names.remove("ray-docs")
    counts = [int(x) for x in args.nodes.split(",")]
    results = {name: {n: [] for n in counts} for name in names}
    leftovers = dict.fromkeys(names, 0)
    sweep()
    for r in range(args.runs):
        for i, n in enumerate(counts):
            k = (r * len(counts) + i) % len(names)
            for name in names[k:] + names[:k]:
                wait_idle()
                took = contenders[name](n)
                wait_idle()
                leftovers[name] += sweep()
                results[name][n].append(took)
                print(
                    f"round {r + 1}/{args.runs}  N={n}  {name:17} first line {took:6.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    med = {name: {n: statistics.median(v) for n, v in per.items()} for name, per in results.items()}
    print(f"Submit → the program's first line on the user's terminal, median of {args.runs} runs, seconds")
    pairs = [
        (a, b)
        for a, b in (
            ("raybridge", "symmetric-run"),
            ("raybridge", "ray-docs"),
            ("raybridge-laptop", "symmetric-laptop"),
        )
        if a in names and b in names
    ]
    header = f"{'N':>2} | " + " | ".join(f"{x:>16}" for x in names) + "".join(f" | {a}/{b}" for a, b in pairs)
    print(header)
    print("-" * len(header))
    for n in counts:
        row = f"{n:>2} | " + " | ".join(f"{med[x][n]:16.2f}" for x in names)
        row += "".join(f" | {med[a][n] / med[b][n]:{len(a) + len(b) + 1}.2f}" for a, b in pairs)
        print(row)
    print(
        "\nProcesses left on the compute nodes after the jobs: "
        + ", ".join(f"{k} {v}" for k, v in leftovers.items())
    )
    if args.json:
        out = args.json.with_name(f"{args.json.stem}-firstline.json")
        out.write_text(json.dumps({"runs": results, "median": med}, indent=2))
    bench_report.save(
        "bench-firstline",
        f"submit → the program's first line on the terminal (median of {args.runs})",
        "seconds (lower is better)",
        {x: {f"N={n}": med[x][n] for n in counts} for x in names},
        {"runs": results, "median": med, "leftovers": leftovers},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
