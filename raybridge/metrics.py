"""Ray's Prometheus metrics, per node: where they are (a file-based service-discovery file per running
cluster, kept by the head) and what they say now (`raybridge metrics`, `status --watch`).

    <shared_dir>/prometheus/<job id>.json   Prometheus file_sd: one target group per alive node

Point an existing Prometheus at that folder (file_sd_configs, files: [".../prometheus/*.json"]);
targets appear when nodes join and go when they die or the job ends.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raybridge import jobdir as jd
from raybridge import trust
from raybridge.layout import SharedDir
from raybridge.transport.runner import Runner

MAX_BODY = 16 << 20  # a node's metrics page; more is not Ray's


def sd_file(shared_dir: str, job_id: str) -> str:
    return SharedDir(shared_dir).sd_file(job_id)


def targets(info: jd.ClusterRecord) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups: one per alive node with a metrics port."""
    head_ip = info.head.ip if info.head else None
    groups = []
    for n in info.nodes:
        port = (n.ports or {}).get("metrics")
        if not n.alive or not port:
            continue
        labels = {
            "raybridge_job": info.job_id,
            "raybridge_job_name": info.job_name,
            "raybridge_node": n.hostname or n.ip,
            "ray_role": "head" if n.ip == head_ip else "worker",
        }
        groups.append({"targets": [f"{n.ip}:{port}"], "labels": labels})
    return sorted(groups, key=lambda g: g["targets"][0])


def write_sd(shared_dir: str, info: jd.ClusterRecord) -> None:
    """Write (atomically) the job's service-discovery file when its targets changed. World-readable
    on purpose: a site's Prometheus runs as another user; it holds addresses and ports only."""
    path = Path(sd_file(shared_dir, info.job_id))
    groups = targets(info)
    text = json.dumps(groups, indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.parent.mkdir(mode=0o755, exist_ok=True)
    st = path.parent.lstat()  # one someone else made (or a link): not where this cluster's targets go
    if why := trust.folder_problem(str(path.parent), st.st_uid, st.st_mode, os.getuid(), own=True):
        raise trust.TrustError(why)
    jd.write_json(path, groups, mode=0o644)


def remove_sd(shared_dir: str, job_id: str) -> None:
    Path(sd_file(shared_dir, job_id)).unlink(missing_ok=True)


# ------------------------------------------------------------------ reading the endpoints


def http_get(runner: Runner, ip: str, port: int, path: str, headers: dict[str, str] | None = None) -> str:
    """GET http://ip:port/path as the login node reaches it (directly, or over the SSH connection)."""
    conn = runner.connect_tcp(ip, port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\n{head}\r\n".encode())
        data = b""
        while len(data) < MAX_BODY and (chunk := conn.recv(1 << 16)):
            data += chunk
    finally:
        conn.close()
    status, _, rest = data.partition(b"\r\n")
    if b" 200 " not in status + b" ":
        raise OSError(f"http://{ip}:{port}{path}: {status.decode(errors='replace')[:80]}")
    return rest.partition(b"\r\n\r\n")[2].decode(errors="replace")


@dataclass(frozen=True)
class NodeMetrics:
    node: str
    target: str
    cpu_percent: float | None = None
    cpus: float | None = None
    mem_used: float | None = None
    mem_total: float | None = None
    gpu_percent: float | None = None
    gpus: float | None = None
    object_store_used: float | None = None
    object_store_total: float | None = None
    net_rx_speed: float | None = None
    net_tx_speed: float | None = None
    tasks_running: float | None = None
    series: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format → {sample name: [(labels, value)]} (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    values = [v for _, v in samples.get(name, [])]
    return sum(values) if values else None


def summarize(node: str, target: str, text: str) -> NodeMetrics:
    s = parse(text)
    gpus = s.get("ray_node_gpus_utilization", [])
    running = [v for labels, v in s.get("ray_tasks", []) if labels.get("State") == "RUNNING"]
    return NodeMetrics(
        node=node,
        target=target,
        cpu_percent=_one(s, "ray_node_cpu_utilization"),
        cpus=_one(s, "ray_node_cpu_count"),
        mem_used=_one(s, "ray_node_mem_used"),
        mem_total=_one(s, "ray_node_mem_total"),
        gpu_percent=(sum(v for _, v in gpus) / len(gpus)) if gpus else None,
        gpus=float(len(gpus)) if gpus else 0.0,
        object_store_used=_one(s, "ray_object_store_used_memory"),
        object_store_total=_total_store(s),
        net_rx_speed=_one(s, "ray_node_network_receive_speed"),
        net_tx_speed=_one(s, "ray_node_network_send_speed"),
        tasks_running=sum(running) if running else 0.0,
        series=sum(len(v) for v in s.values()),
    )


def _total_store(s: dict[str, list[tuple[dict[str, str], float]]]) -> float | None:
    used, avail = _one(s, "ray_object_store_used_memory"), _one(s, "ray_object_store_available_memory")
    return used + avail if used is not None and avail is not None else None


def scrape(runner: Runner, info: jd.ClusterRecord) -> list[NodeMetrics]:
    """Every alive node's metrics now; a node that does not answer gets its error, not an exception."""
    out = []
    for g in targets(info):
        target, node = g["targets"][0], g["labels"]["raybridge_node"]
        ip, port = target.rsplit(":", 1)
        try:
            out.append(summarize(node, target, http_get(runner, ip, int(port), "/metrics")))
        except (OSError, ValueError) as e:
            out.append(NodeMetrics(node=node, target=target, error=str(e)[:200]))
    return out


def gib(x: float | None) -> str:
    return "?" if x is None else f"{x / 1024**3:.1f}"


def lines(nodes: list[NodeMetrics]) -> list[str]:
    out = [
        f"{'node':10} {'target':22} {'cpu%':>6} {'mem GiB':>11} {'gpu%':>5} {'store GiB':>11} {'tasks':>5} {'net MB/s':>13}"
    ]
    for m in nodes:
        if m.error:
            out.append(f"{m.node:10} {m.target:22} no answer: {m.error}")
            continue
        cpu = "?" if m.cpu_percent is None else f"{m.cpu_percent:.0f}"
        gpu = "-" if not m.gpus else f"{m.gpu_percent or 0:.0f}"
        net = (
            "?"
            if m.net_rx_speed is None
            else f"{(m.net_rx_speed or 0) / 1e6:.1f}/{(m.net_tx_speed or 0) / 1e6:.1f}"
        )
        out.append(
            f"{m.node:10} {m.target:22} {cpu:>6} {gib(m.mem_used) + '/' + gib(m.mem_total):>11} {gpu:>5} "
            f"{gib(m.object_store_used) + '/' + gib(m.object_store_total):>11} {m.tasks_running or 0:>5.0f} {net:>13}"
        )
    return out
