"""`raybridge doctor` on one compute node: what a Ray node started here would meet.

Started by the doctor's short Slurm step (one task per node) with the same environment and settings
as a cluster's agents. The nodes meet in a folder on shared storage (which is itself checked): each
publishes a listening address on the chosen interface, connects to every other's, and prints one
line `RBDOCTOR {json}` with its results on stdout, which Slurm brings back to the login node. Nothing
here needs shared storage to report: a node that cannot write there still reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from raybridge import envcheck
from raybridge.agent import netinfo, ports, resources
from raybridge.settings import AgentSettings

MARK = "RBDOCTOR "
MEET_S = 15.0  # how long to wait for the other nodes' addresses
CONNECT_S = 3.0


def check(name: str, status: str, detail: str, fix: str = "") -> dict[str, str]:
    return {"check": name, "status": status, "detail": detail, "fix": fix}


def shared_storage(folder: Path, host: str, login_mark: str) -> tuple[dict[str, str], bool]:
    """Writable here, and the same folder the login node wrote to (its mark is visible)."""
    probe = folder / f"write-{host}"
    try:
        probe.write_text(host)
    except OSError as e:
        return check(
            "shared storage",
            "fail",
            f"cannot write {folder} ({e.strerror or e})",
            "mount the shared file system read-write on this node, or set shared_dir to one that is",
        ), False
    if not (folder / login_mark).exists():
        return check(
            "shared storage",
            "fail",
            f"{folder} is not the folder the login node wrote (its mark is missing)",
            "shared_dir must be the same path on the login node and every compute node",
        ), True
    return check("shared storage", "pass", f"{folder.parent} writable, same path as on the login node"), True


def interface(settings: AgentSettings) -> tuple[dict[str, str], netinfo.Iface | None]:
    policy = ",".join(settings.interface)
    try:
        iface = netinfo.choose(list(settings.interface), netinfo.ipv4_interfaces())
    except LookupError as e:
        return check(
            "interface", "fail", str(e), "bring the interface up, or name one that exists in `interface:`"
        ), None
    return check("interface", "pass", f"{iface.name} {iface.ip} (policy {policy})"), iface


def holders() -> dict[int, str]:
    """Listening TCP port → the process that holds it (or why it cannot be named)."""
    out: dict[int, str] = {}
    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="tcp"):
            if c.status != psutil.CONN_LISTEN or not c.laddr:
                continue
            who = "a process of another user"
            if c.pid:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(c.pid)
                    who = f"pid {c.pid} ({p.name()}, user {p.username()}: {' '.join(p.cmdline())[:80]})"
            out.setdefault(c.laddr.port, who)
    return out


def port_block(settings: AgentSettings) -> dict[str, str]:
    """The block of ports a cluster in this very job would use: every one must bind."""
    plan = ports.plan_for_block(ports.first_block(settings.job_id))
    names = {getattr(plan, n): n for n in ports.NAMED}
    busy = [p for p in plan.all_ports() if not ports.is_free(p)]
    first = f"{plan.gcs}-{plan.max_worker}"
    if not busy:
        return check("ports", "pass", f"block {first} free")
    held = holders()
    said = "; ".join(
        f"{p} ({names.get(p, 'worker')}) held by {held.get(p, 'an unknown process')}" for p in busy[:4]
    )
    more = f" and {len(busy) - 4} more" if len(busy) > 4 else ""
    return check(
        "ports",
        "fail",
        f"{len(busy)} port(s) of block {first} in use: {said}{more}",
        "stop that process; raybridge would move this job to the next free block, which costs a retry",
    )


def shm(settings: AgentSettings, env: Mapping[str, str]) -> dict[str, str]:
    mem = resources.memory_bytes(env)
    want = int(mem * settings.object_store_fraction)
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError as e:
        return check("/dev/shm", "warn", f"cannot read /dev/shm ({e.strerror}): Ray spills to disk", "")
    gib = 1024**3
    if free < want:
        return check(
            "/dev/shm",
            "warn",
            f"{free / gib:.1f} GiB free < planned object store {want / gib:.1f} GiB: Ray keeps objects "
            "on disk instead (slow)",
            "lower object_store_fraction, or ask the site for a larger /dev/shm",
        )
    return check("/dev/shm", "pass", f"{free / gib:.1f} GiB free ≥ object store {want / gib:.1f} GiB")


def cgroup_limits() -> tuple[int | None, int | None]:
    """CPUs (affinity) and memory (cgroup v2/v1 limit) this process may use, when limited."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    mem = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            if text.isdigit() and int(text) < 1 << 60:
                mem = int(text)
                break
    return cpus, mem


def granted(settings: AgentSettings, env: Mapping[str, str]) -> dict[str, str]:
    """What raybridge would give Ray here vs what Slurm and the cgroup grant, and what Ray alone
    would assume (the whole node)."""
    res = resources.detect(env, settings.object_store_fraction, settings.gpus_per_node)
    cpus, mem = cgroup_limits()
    node_cpus, node_mem = os.cpu_count() or 0, psutil.virtual_memory().total
    gib = 1024**3
    detail = (
        f"Ray gets {res.cpus} CPUs, {res.memory_bytes / gib:.1f} GiB, {len(res.gpu_ids)} GPUs "
        f"(Slurm: {env.get('SLURM_CPUS_ON_NODE', '?')} CPUs, mem {env.get('SLURM_MEM_PER_NODE', '?')} MiB); "
        f"Ray alone would assume {node_cpus} CPUs, {node_mem / gib:.1f} GiB"
    )
    over = []
    if cpus is not None and res.cpus > cpus:
        over.append(f"{res.cpus} CPUs > {cpus} this job may run on")
    if mem is not None and res.memory_bytes > mem:
        over.append(f"{res.memory_bytes / gib:.1f} GiB > cgroup limit {mem / gib:.1f} GiB")
    if over:
        return check(
            "resources", "fail", "; ".join(over) + f" ({detail})", "set cpus_per_node / memory_per_node"
        )
    return check("resources", "pass", detail)


def collectives(iface: netinfo.Iface | None, env: Mapping[str, str]) -> dict[str, str]:
    """NCCL/GLOO interface variables: raybridge sets both to Ray's interface for Ray's workers; a
    different value given by the site or the profile is a sign of a second, conflicting setting."""
    if iface is None:
        return check("NCCL/GLOO", "skip", "no interface")
    names = {i.name for i in netinfo.ipv4_interfaces()}
    bad = []
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        value = env.get(var)
        if value and value.lstrip("=^") not in names:
            bad.append(f"{var}={value} names no interface here")
        elif value and value.lstrip("=^") != iface.name:
            bad.append(f"{var}={value} differs from Ray's {iface.name}")
    if bad:
        return check("NCCL/GLOO", "warn", "; ".join(bad), f"unset them: raybridge sets both to {iface.name}")
    hca = env.get("NCCL_IB_HCA")
    if hca and not Path("/sys/class/infiniband", hca.lstrip("=^").split(":")[0].split(",")[0]).exists():
        return check("NCCL/GLOO", "warn", f"NCCL_IB_HCA={hca}: no such HCA here", "fix nccl_ib_hca")
    return check("NCCL/GLOO", "pass", f"NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME will be {iface.name}")


def versions() -> dict[str, str]:
    v = envcheck.versions()
    v["torch"] = envcheck.dist_version("torch") or "none"
    return v


class Listener:
    """Accepts and closes connections on the chosen interface until closed."""

    def __init__(self, ip: str):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((ip, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.open = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.open:
            with contextlib.suppress(OSError):
                conn, _ = self.sock.accept()
                conn.close()

    def close(self) -> None:
        self.open = False
        self.sock.close()


def reach(peers: dict[str, dict[str, Any]], me: str) -> dict[str, str]:
    out = {}
    for host, addr in sorted(peers.items()):
        if host == me:
            continue
        try:
            with socket.create_connection((addr["ip"], addr["port"]), timeout=CONNECT_S):
                out[host] = "ok"
        except OSError as e:
            out[host] = f"{addr['ip']}:{addr['port']}: {e.strerror or e}"
    return out


def read_peers(folder: Path) -> dict[str, dict[str, Any]]:
    peers = {}
    for f in folder.glob("addr-*.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(f.read_text())
            if isinstance(data, dict) and {"host", "ip", "port"} <= data.keys():
                peers[str(data["host"])] = data
    return peers


def wait_for(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)


def run(settings: AgentSettings, env: Mapping[str, str], folder: Path, nodes: int, login_mark: str) -> dict:
    host = netinfo.short_hostname()
    checks = []
    storage, writable = shared_storage(folder, host, login_mark)
    checks.append(storage)
    iface_check, iface = interface(settings)
    checks += [iface_check, port_block(settings), shm(settings, env), granted(settings, env)]
    checks.append(collectives(iface, env))
    result: dict[str, Any] = {"host": host, "versions": versions(), "iface": iface.name if iface else None}
    listener = Listener(iface.ip) if iface else None
    published = False
    if listener and writable:
        addr = {"host": host, "ip": iface.ip, "port": listener.port}
        with contextlib.suppress(OSError):
            (folder / f"addr-{host}.json").write_text(json.dumps(addr))
            published = True
    try:
        if iface:
            wait_for(lambda: len(read_peers(folder)) >= nodes, MEET_S)
            result["reach"] = reach(read_peers(folder), host)
        result["published"] = published
        if writable:  # keep listening until every node that could publish has connected
            with contextlib.suppress(OSError):
                (folder / f"done-{host}").write_text("")
        wait_for(lambda: len(list(folder.glob("done-*"))) >= len(read_peers(folder)), MEET_S)
    finally:
        if listener:
            listener.close()
    result["checks"] = checks
    return result


def main(settings: AgentSettings, argv: list[str]) -> int:
    """argv: FOLDER NODES LOGIN_MARK"""
    if len(argv) != 3 or not argv[1].isdigit():
        print("raybridge agent: usage: doctor FOLDER NODES LOGIN_MARK", flush=True)
        return 2
    result = run(settings, os.environ, Path(argv[0]), int(argv[1]), argv[2])
    print(MARK + json.dumps(result, sort_keys=True), flush=True)
    return 0
