"""The job folder on shared storage: the single source of truth about a running cluster.

<shared_dir>/jobs/<job id>/
    token          random auth token (0600)
    head.json      the head's address and ports (rendezvous for the workers)
    nodes/<rank>.json   one per node that joined
    cluster.json   everything a client needs; refreshed by the head while the cluster runs
    stop           present = please tear down (written by `raybridge down` / the driver's end)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

TOKEN = "token"
HEAD = "head.json"
NODES = "nodes"
CLUSTER = "cluster.json"
STOP = "stop"
PREEMPT = "preempt"  # Slurm warned of the time limit / preemption: training should checkpoint now


def now() -> float:
    return round(time.time(), 3)


def write_json(path: str | Path, data: dict[str, Any], mode: int = 0o600) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
