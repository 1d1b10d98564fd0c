"""What the training benchmarks share: the `raybridge run` command for the example, and its RESULT line."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_run_argv(profile: str, nodes: int, *example_args: str) -> list[str]:
    """`raybridge run` of examples/train_mlp.py on `nodes` nodes (run it on the login node)."""
    return [
        str(REPO / ".venv/bin/raybridge"),
        "run",
        "--nodes",
        str(nodes),
        "--profile",
        profile,
        "--",
        "python",
        str(REPO / "examples/train_mlp.py"),
        *example_args,
    ]


def result(text: str) -> dict:
    """The last `RESULT: {...}` line a training run printed."""
    found = re.findall(r"RESULT: (\{.*\})", text)
    if not found:
        raise RuntimeError("no RESULT line:\n" + text[-3000:])
    return json.loads(found[-1])


def events(run: Path) -> list[dict]:
    """The example's timestamps (examples/train_mlp.py writes run/events.jsonl)."""
    f = run / "events.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def high_water(run: Path) -> int:
    """The highest step the training completed (run/progress.json), 0 before it has one."""
    try:
        return json.loads((run / "progress.json").read_text())["high_water"]
    except (OSError, ValueError):
        return 0
