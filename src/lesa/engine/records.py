"""Run-directory outputs: metrics.csv, TensorBoard events, the training-curve figure, summary.json."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any, Optional

from ..utils import atomic_write


def write_metrics_csv(path: Path, history: list[dict[str, Any]], columns: list[str]) -> None:
    """The whole history in the task's ``columns``, rewritten atomically (a resumed run rewrites it from its
    checkpoint)."""

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


def plot_curves(runs: dict[str, list[list[dict[str, float]]]], path: Path, metric: tuple[str, str], title: str = ""
                ) -> None:
    """The paper's Fig. 5 for one run or several seeds per label: per epoch, the mean (line) and mean ±
    sample standard deviation (band) of the training and validation loss and of the validation ``metric`` (its
    column and axis label, e.g. ``("val_top1", "val top-1 (%)")``). ``runs`` maps a label to its histories
    (``metrics.csv`` rows, one list per seed); epochs beyond the shortest history are left out. A single history
    is drawn as a line without a band; histories of one epoch as points with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, histories) in enumerate(runs.items()):
        histories = [h for h in histories if h]
        if not histories:
            continue
        n = min(len(h) for h in histories)
        epochs = np.array([row["epoch"] for row in histories[0][:n]], dtype=np.float64)
        if n == 1:  # single points side by side rather than on top of each other
            epochs += 0.05 * (i - (len(runs) - 1) / 2)
        color = f"C{i}"
        suffix = f" (n={len(histories)})" if len(histories) > 1 else ""
        for ax, key, style, name in ((ax_loss, "train_loss", "-", f"{label} train"),
                                     (ax_loss, "val_loss", "--", f"{label} val"),
                                     (ax_acc, metric[0], "-", label)):
            values = np.array([[row[key] for row in h[:n]] for h in histories], dtype=np.float64)
            mean = values.mean(0)
            # markers wherever a line would be too short to see (a run of one epoch has a point, no line)
            marker = "o" if ax is ax_acc or n == 1 else None
            ax.plot(epochs, mean, style, color=color, label=name + suffix, marker=marker, ms=3,
                    mfc="none" if style == "--" else color)
            if len(histories) > 1:
                std = values.std(0, ddof=1)
                lower = mean - std if ax is ax_acc else np.maximum(mean - std, mean * 1e-3)
                if n == 1:  # a band needs two epochs: an error bar instead
                    ax.errorbar(epochs, mean, yerr=[mean - lower, std], color=color, capsize=3, lw=1, fmt="none")
                else:
                    ax.fill_between(epochs, lower, mean + std, color=color, alpha=0.15, lw=0)
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel=metric[1], title="validation")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
