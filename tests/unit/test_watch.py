"""The live view renders a snapshot: header, nodes (alive, dead, left, no metrics), Ray jobs, checkpoint."""

import re

from rich.console import Console

from raybridge.cli.watch import Snapshot, view
from raybridge.metrics import NodeMetrics


def test_a_snapshot_renders_every_part():
    m = NodeMetrics(
        node="n2",
        target="10.0.0.2:1",
        cpu_percent=42.4,
        mem_used=2 << 30,
        mem_total=8 << 30,
        object_store_used=0,
        object_store_total=1 << 30,
        tasks_running=3,
        gpus=0,
    )
    s = Snapshot(
        job_id="9",
        slurm="RUNNING",
        reason="None",
        ray_state="ready",
        alive=2,
        expected=3,
        generation=1,
        nodes=[
            {"node": "n2", "ip": "10.0.0.2", "alive": True, "metrics": m},
            {"node": "n3", "ip": "10.0.0.3", "alive": True, "metrics": None},
            {"node": "n4", "ip": "10.0.0.4", "alive": False, "metrics": None},
            {"node": "n5", "ip": "10.0.0.5", "alive": False, "left": True, "metrics": None},
        ],
        ray_jobs=[{"submission_id": "raysubmit_1", "status": "RUNNING", "entrypoint": "python train.py"}],
        checkpoint="checkpoint_000003 (step 150, 4s ago)",
        at=0.0,
    )
    console = Console(record=True, width=120)
    console.print(view(s))
    text = console.export_text()
    assert "job 9  Slurm RUNNING  Ray ready  2/3 nodes alive  head generation 1" in text
    lines = text.splitlines()
    assert any(line.split()[:5] == ["n2", "alive", "42%", "2.0/8.0", "-"] for line in lines), text
    assert any(line.split()[:2] == ["n4", "DEAD"] for line in lines), text
    assert any(line.split()[:2] == ["n5", "left"] for line in lines), text  # a released member's node
    assert any(line.split()[:3] == ["n3", "alive", "?"] for line in lines), text
    assert re.search(r"raysubmit_1\s+RUNNING\s+python train.py", text), text
    assert "last checkpoint: checkpoint_000003 (step 150, 4s ago)" in text
