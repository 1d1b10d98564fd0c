"""Tunnel benchmark: raybridge's paramiko forwarder vs OpenSSH `ssh -N -L`, same path, same run.

Runs on the laptop (scripts/bench-tunnel starts it there). Both tunnels go laptop → login → head.
  latency     dashboard /api/version with the token, a fresh TCP connection per request
              (what a CLI does), requests interleaved between the two tunnels; median and p90
  throughput  one large file from an HTTP server on the head node, through each tunnel
  pull        a multi-GB checkpoint on shared storage copied to the laptop: `raybridge checkpoints pull`
              (sha256-verified, 1 and N streams) vs one OpenSSH stream (`scp -r`, `sftp get -r`; neither
              verifies beyond SSH's own integrity check); each copy into a fresh folder, best of --pulls
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import bench_report

from raybridge.client.access import make_forwarder
from raybridge.client.cluster import attach
from raybridge.client.profile import load_spec
from raybridge.transport.connect import open_runner
from raybridge.transport.ssh import connect, resolve_target
from raybridge.transport.tunnel import Forwarder, Route, Target


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def request(port: int, path: str, token: str | None) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    resp = conn.getresponse()
    n = 0
    while chunk := resp.read(1 << 20):
        n += len(chunk)
    conn.close()
    return time.perf_counter() - t0, resp.status, n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--ssh-config", required=True)
    ap.add_argument("--file-port", type=int, required=True, help="HTTP server on the head serving /big.bin")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--transfers", type=int, default=3)
    ap.add_argument("--pull-run", help="run name of the checkpoint to pull (skip the pull if not given)")
    ap.add_argument("--pull-source", help="the checkpoint folder on the login node")
    ap.add_argument("--pull-dest", help="a scratch folder on the laptop")
    ap.add_argument("--pulls", type=int, default=3)
    ap.add_argument("--streams", type=int, default=4)
    args = ap.parse_args()
    if args.pull_run:
        pull_bench(args)

    spec = load_spec(args.profile)
    runner = open_runner(spec.login)
    cluster = attach(spec, runner, args.job)
    info = cluster.info()
    token = runner.read_text(info.token_path).strip()
    head_ip, dash = info.head.ip, info.ports["dashboard"]
    runner.close()

    fwd = make_forwarder(spec, cluster.job_dir, {"dashboard": 0})
    fwd.start()
    # The same forwarder class, pointed at the head's file server instead of the dashboard.
    target = resolve_target(spec.login)
    fwd_file = Forwarder(
        lambda: connect(target),
        lambda _c: Route({"file": Target("file", head_ip, args.file_port)}),
        {"file": 0},
    )
    fwd_file.start()
    ours = {"latency": fwd.local_ports["dashboard"], "file": fwd_file.local_ports["file"]}
    theirs = {"latency": 28265, "file": 28266}
    ssh = subprocess.Popen(
        [
            "ssh",
            "-F",
            args.ssh_config,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"{theirs['latency']}:{head_ip}:{dash}",
            "-L",
            f"{theirs['file']}:{head_ip}:{args.file_port}",
            "login",
        ]
    )
    try:
        wait_port(theirs["latency"])
        wait_port(theirs["file"])
        for port in (ours["latency"], theirs["latency"]):  # warm up both paths
            for _ in range(5):
                assert request(port, "/api/version", token)[1] == 200
        lat: dict[str, list[float]] = {"raybridge": [], "openssh": []}
        for _ in range(args.requests):
            for name, port in (("raybridge", ours["latency"]), ("openssh", theirs["latency"])):
                dt, status, _ = request(port, "/api/version", token)
                assert status == 200, status
                lat[name].append(dt * 1000)
        thr: dict[str, list[float]] = {"raybridge": [], "openssh": []}
        size = 0
        for _ in range(args.transfers):
            for name, port in (("raybridge", ours["file"]), ("openssh", theirs["file"])):
                dt, status, size = request(port, "/big.bin", None)
                assert status == 200, status
                thr[name].append(size / dt / 2**20)
    finally:
        ssh.terminate()
        fwd.stop()
        fwd_file.stop()

    def p90(v: list[float]) -> float:
        return sorted(v)[int(0.9 * (len(v) - 1))]

    rl, ol = statistics.median(lat["raybridge"]), statistics.median(lat["openssh"])
    rt, ot = statistics.median(thr["raybridge"]), statistics.median(thr["openssh"])
    print(
        f"Tunnel laptop → login → head, {args.requests} requests and {args.transfers} transfers of "
        f"{size / 2**20:.0f} MiB each (medians)"
    )
    print(f"{'':12} | {'raybridge':>10} | {'OpenSSH -L':>10} | {'ratio':>6}")
    print(f"{'latency ms':12} | {rl:10.2f} | {ol:10.2f} | {rl / ol:6.2f}")
    print(
        f"{'p90 ms':12} | {p90(lat['raybridge']):10.2f} | {p90(lat['openssh']):10.2f} | "
        f"{p90(lat['raybridge']) / p90(lat['openssh']):6.2f}"
    )
    print(f"{'MiB/s':12} | {rt:10.1f} | {ot:10.1f} | {rt / ot:6.2f}")
    bench_report.save(
        "bench-tunnel",
        "Tunnel laptop → login → head: throughput (median)",
        "MiB/s (higher is better)",
        {"raybridge": {"throughput": rt}, "OpenSSH -L": {"throughput": ot}},
        {"latency_ms": lat, "throughput_mib_s": thr},
    )
    return 0


def pull_bench(args: argparse.Namespace) -> None:
    import shutil
    from pathlib import Path

    dest = Path(args.pull_dest)
    size = sum(f.stat().st_size for f in Path(args.pull_source).rglob("*") if f.is_file())
    rb = [sys.executable, "-m", "raybridge", "checkpoints", "pull", args.pull_run]
    ssh = ["-F", args.ssh_config, "-o", "BatchMode=yes"]

    def pull(streams: int, *env: str) -> Callable[[Path], list[str]]:
        return lambda d: ["env", *env, *rb, str(d), "--streams", str(streams), "--profile", args.profile]

    contenders = {
        "raybridge, 1 stream": pull(1),
        f"raybridge, {args.streams} streams": pull(args.streams),
        f"raybridge, {args.streams} streams, paramiko only": pull(
            args.streams, "RAYBRIDGE_PULL_CLIENT=paramiko"
        ),
        "scp -r": lambda d: ["scp", "-q", "-r", *ssh, f"login:{args.pull_source}", str(d)],
        "sftp get -r": lambda d: [
            "sh",
            "-c",
            f"echo 'get -r {args.pull_source} {d}' | sftp -q {' '.join(ssh)} -b - login",
        ],
    }
    times: dict[str, list[float]] = {}
    for _ in range(args.pulls):
        for name, argv in contenders.items():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            t0 = time.perf_counter()
            r = subprocess.run(argv(dest), capture_output=True, text=True)
            took = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"{name} failed: {r.stderr[-2000:]}")
            got = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
            if got != size:
                raise SystemExit(f"{name} copied {got} of {size} bytes")
            times.setdefault(name, []).append(took)
            print(
                f"pull  {name:22} {took:6.2f} s  {size / took / 2**20:7.1f} MiB/s",
                file=sys.stderr,
                flush=True,
            )
    shutil.rmtree(dest, ignore_errors=True)
    best = {name: statistics.median(t) for name, t in times.items()}
    base = best["scp -r"]
    print(
        f"Checkpoint pull, {size / 2**30:.1f} GiB, login → laptop (median of {args.pulls}; ratio = scp time / time)"
    )
    print(f"{'':22} | {'seconds':>8} | {'MiB/s':>7} | {'vs scp':>6}")
    for name, took in best.items():
        print(f"{name:22} | {took:8.2f} | {size / took / 2**20:7.1f} | {base / took:6.2f}")
    print()
    bench_report.save(
        "bench-pull",
        f"Checkpoint pull, {size / 2**30:.1f} GiB, login → laptop (median of {args.pulls})",
        "MiB/s (higher is better)",
        {name: {"pull": size / took / 2**20} for name, took in best.items()},
        times,
    )


if __name__ == "__main__":
    sys.exit(main())
