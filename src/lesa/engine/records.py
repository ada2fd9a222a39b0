"""Run-directory outputs: metrics.csv, TensorBoard events, the training-curve figure, summary.json."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any, Optional

from ..utils import atomic_write

METRIC_COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_time_s"]


def write_metrics_csv(path: Path, history: list[dict[str, Any]], columns: Optional[list[str]] = None) -> None:
    """The whole history, rewritten atomically (a resumed run rewrites it from its checkpoint)."""
    columns = columns or METRIC_COLUMNS

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


class TensorBoard:
    """A SummaryWriter when TensorBoard is installed (``pip install lesa[tb]``); otherwise a no-op."""

    def __init__(self, log_dir: Optional[Path]) -> None:
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed: no event files (pip install 'lesa[tb]')", stacklevel=2)
            return
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(runs: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> None:
    """Train/val loss and val top-1 per epoch for one or more runs (the paper's Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, history) in enumerate(runs.items()):
        if not history:
            continue
        color = f"C{i}"
        epochs = [row["epoch"] for row in history]
        ax_loss.plot(epochs, [row["train_loss"] for row in history], "-", color=color, label=f"{label} train")
        ax_loss.plot(epochs, [row["val_loss"] for row in history], "--", color=color, label=f"{label} val")
        ax_acc.plot(epochs, [row["val_top1"] for row in history], "-o", ms=3, color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
