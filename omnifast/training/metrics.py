"""A run's ``metrics.jsonl`` (one JSON object per optimizer step, written by rank 0) and its loss
curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List


def read_metrics(path) -> List[Dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def append_metrics(path: Path, row: Dict) -> None:
    with Path(path).open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the rows past ``step`` (what an interrupted run logged after its last checkpoint)."""
    path = Path(path)
    if path.is_file():
        kept = [json.dumps(r) for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def plot_losses(metrics_path: Path, png_path: Path, title: str) -> bool:
    """A loss curve (when there are steps to draw); False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    if not metrics_path.is_file():  # a run with no steps to draw
        return True
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    fig, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return True
