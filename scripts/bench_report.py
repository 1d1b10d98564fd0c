"""What every benchmark leaves behind besides its printed table: its results as JSON and a PNG chart
(matplotlib), in bench-results/ (or $RAYBRIDGE_BENCH_OUT). The README's charts are copies of these."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def out_dir() -> Path:
    d = Path(os.environ.get("RAYBRIDGE_BENCH_OUT") or REPO / "bench-results")
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(name: str, title: str, ylabel: str, table: dict[str, dict[str, float]], raw: object = None) -> Path:
    """table: {series: {group: value}} (e.g. {"raybridge": {"N=1": 4.8, ...}, "symmetric-run": {...}}),
    drawn as grouped bars with their values. Returns the PNG's path (the JSON sits next to it)."""
    d = out_dir()
    meta = {
        "name": name,
        "title": title,
        "ylabel": ylabel,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "table": table,
        "raw": raw,
    }
    (d / f"{name}.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    png = d / f"{name}.png"
    try:
        chart(png, title, ylabel, table)
    except ImportError:  # a Python without matplotlib (e.g. the users' venv): the JSON only
        print(f"results: {d / f'{name}.json'} (no chart: matplotlib is not installed here)")
        return png
    print(f"results: {d / f'{name}.json'}, chart: {png}")
    return png


def chart(path: Path, title: str, ylabel: str, table: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(table)
    groups = list(dict.fromkeys(g for s in series for g in table[s]))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) * max(len(series), 1) * 0.6 + 2), 4))
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ys = [table[s].get(g, 0.0) for g in groups]
        bars = ax.bar(xs, ys, width, label=s)
        ax.bar_label(bars, labels=[f"{y:.3g}" if y else "" for y in ys], fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
