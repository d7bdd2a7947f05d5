"""A run's metrics, one row per optimizer step (and per evaluation), under the names TRL and
torchtitan users read: ``loss``, ``lr`` (the rate that step used), ``grad_norm`` (before clipping),
``throughput(tps)``, ``data_loading(%)``; on CUDA ``memory/max_active(GiB)``,
``memory/max_reserved(GiB)`` and ``mfu(%)``; for CTC-DPO ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; held-out
evaluations as ``eval/...``. Written by rank 0 to ``metrics.jsonl`` always, and to TensorBoard and
W&B (offline) when ``report_to`` names them, as the Hugging Face Trainer's ``--report_to`` does;
the loss-curve PNG draws the main ones."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

REPORT_TO = ("tensorboard", "wandb")
PLOTTED = ("loss", "eval/loss", "lr", "grad_norm", "rewards/margins", "rewards/accuracies")


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


def check_report_to(report_to: Sequence[str]) -> None:
    """Every sink named is known and its package installed (a ValueError naming it, before any work)."""
    unknown = [name for name in report_to if name not in REPORT_TO]
    if unknown:
        raise ValueError(
            f"report_to: unknown sinks {unknown}; the sinks are {', '.join(REPORT_TO)} "
            f"(metrics.jsonl is always written)"
        )
    for name, module, package in (
        ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
        ("wandb", "wandb", "wandb"),
    ):
        if name in report_to:
            try:
                __import__(module)
            except ImportError:
                raise ValueError(f"report_to {name} needs the {package} package: pip install {package}") from None


class MetricsLog:
    """``metrics.jsonl`` in ``out_dir`` and the sinks of ``report_to`` (TensorBoard under
    ``out_dir/runs``, W&B offline under ``out_dir/wandb``). Only rank 0 makes one."""

    def __init__(self, out_dir: Path, report_to: Sequence[str], run_name: str, config: Dict, first_step: int):
        check_report_to(report_to)
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(out_dir) / "runs"), purge_step=first_step + 1)
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(
                mode="offline", dir=str(out_dir), project="omnifast", name=run_name, config=config, reinit=True
            )

    def log(self, row: Dict) -> None:
        append_metrics(self.path, row)
        step = row["step"]
        numbers = {
            k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, png_path: Path, title: str) -> bool:
    """The run's curves, one panel per metric it has of ``PLOTTED`` (when there are steps to
    draw); False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    if not metrics_path.is_file():  # a run with no steps to draw
        return True
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    names = [name for name in PLOTTED if any(name in row for row in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o" if name.startswith("eval/") else None)
        axis.set_xlabel("step")
        axis.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return True
