"""Autoscaling with Ray's own autoscaler: a node provider backed by Slurm member jobs.

Ray's autoscaler (v1, the one `ray up` runs for every VM provider) runs in the head's monitor process
when the head is started with `--autoscaling-config`; it loads raybridge.autoscaler.provider's
SlurmNodeProvider through its documented `provider: {type: external, module: ...}` hook and asks it
for nodes. Here a node is a one-node
member job (slurm/raybridge-member.sbatch.in, the same script `--replace-lost` submits):

    create_node     sbatch the member script (<job>/member.sbatch, if it passes the trust rule) with the
                    cluster's remaining time; tags go into the
                    job's MemberRecord (<job>/members/<member job>.json)
    terminate_node  the release flag (the member's agent gives Ray's drain notice and leaves), then
                    scancel; a member still pending is cancelled at once
    nodes           the head (kind head), the allocation's other nodes and members added by hand or
                    as replacements (kind unmanaged: the autoscaler neither counts nor removes them),
                    the autoscaled members (kind worker)

A member whose Ray has not joined `join_timeout` seconds after its submission is cancelled and an
event says why (Slurm's state and reason). Nothing here starts Ray: the member's own agent does
(`disable_node_updaters`), so the autoscaler needs no SSH.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from raybridge import jobdir as jd
from raybridge.settings import AgentSettings

PROVIDER = "raybridge.autoscaler.provider.SlurmNodeProvider"  # imports Ray: a module of its own
# Ray's autoscaler's loop, seconds (its env AUTOSCALER_UPDATE_INTERVAL_S; each look reads the job
# folder and asks the GCS, and Slurm only as QUEUE_CACHE_S allows).
UPDATE_INTERVAL_S = 1
QUEUE_CACHE_S = 5.0  # how often, at most, the provider asks Slurm about member jobs it already knows
HEAD_TYPE = "head"
WORKER_TYPE = "slurm"


def config_path(job_dir: str) -> str:
    return posixpath.join(job_dir, "autoscaler.yaml")  # (the job folder may be across SSH: POSIX)


def autoscaling_config(settings: AgentSettings, cpus: int, gpus: int, memory_bytes: int) -> dict[str, Any]:
    """The autoscaler's cluster config (YAML; written as JSON, which YAML reads). Complete as Ray's
    `prepare_config` would make it: the monitor reads the file as it is. A member node has the
    head's shape (same partition and per-node resources as the allocation)."""
    static = settings.nodes  # the allocation's nodes: never started or stopped by the autoscaler
    members_max = max((settings.max_nodes or static) - static, 0)
    resources: dict[str, int] = {"CPU": cpus, "memory": memory_bytes}
    if gpus:
        resources["GPU"] = gpus
    empty: list[Any] = []
    return {
        "cluster_name": f"raybridge-{settings.job_id}",
        "max_workers": members_max,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": round(settings.idle_timeout / 60, 4),
        "provider": {
            "type": "external",
            "module": PROVIDER,
            "disable_node_updaters": True,  # the member's own agent starts Ray: no SSH
            "job_dir": settings.job_dir,
            "cluster_job": settings.job_id,
            "logs": settings.layout.output,
            "join_timeout": settings.join_timeout,
            "limits": {  # for `status` (Ray passes provider keys through untouched)
                "min_nodes": max(settings.min_nodes or static, static),
                "max_nodes": static + members_max,
                "idle_timeout": settings.idle_timeout,
                "join_timeout": settings.join_timeout,
            },
        },
        "auth": {},
        "available_node_types": {
            HEAD_TYPE: {"resources": {}, "node_config": {}, "min_workers": 0, "max_workers": 0},
            WORKER_TYPE: {
                "resources": resources,
                "node_config": {},
                "min_workers": min(max((settings.min_nodes or static) - static, 0), members_max),
                "max_workers": members_max,
            },
        },
        "head_node_type": HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": empty,
        "file_mounts_sync_continuously": False,
        "rsync_exclude": empty,
        "rsync_filter": empty,
        "initialization_commands": empty,
        "setup_commands": empty,
        "head_setup_commands": empty,
        "worker_setup_commands": empty,
        "head_start_ray_commands": empty,
        "worker_start_ray_commands": empty,
    }


def write_config(settings: AgentSettings, cpus: int, gpus: int, memory_bytes: int) -> str:
    """Write the head's autoscaler config into the job folder (0600); its path."""
    path = config_path(settings.job_dir)
    jd.write_json(path, autoscaling_config(settings, cpus, gpus, memory_bytes))
    return path


def limits(text: str | None) -> dict[str, int] | None:
    """The autoscaling limits from a config file's text (`status`), None if there is none."""
    try:
        data = json.loads(text or "")
        found = data["provider"]["limits"]
    except (ValueError, KeyError, TypeError):
        return None
    keys = ("min_nodes", "max_nodes", "idle_timeout", "join_timeout")
    if not isinstance(found, dict) or not all(isinstance(found.get(k), int) for k in keys):
        return None
    return {k: found[k] for k in keys}
