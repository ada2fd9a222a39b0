"""Figures of the analyses (PNG, matplotlib): shares per layer, gate maps, attention maps."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from ..utils import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)


def plot_shares(shares: dict[str, dict[str, Any]], path: Path) -> None:
    """Stacked unary/binary bars per layer; ``shares`` maps a label (model/operation) to the result of
    :func:`~lesa.analysis.unary_binary_shares`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shares), figsize=(3.2 * len(shares) + 1, 3.6), squeeze=False, sharey=True)
    for ax, (label, result) in zip(axes[0], shares.items()):
        names = [layer["name"].replace(".conv2", "") for layer in result["layers"]]
        unary = [layer["unary_pct"] for layer in result["layers"]]
        binary = [layer["binary_pct"] for layer in result["layers"]]
        xs = range(len(names))
        ax.bar(xs, unary, color="tab:red", label="unary")
        ax.bar(xs, binary, bottom=unary, color="tab:blue", label="binary")
        ax.set_xticks(list(xs), names, rotation=60, fontsize=7)
        ax.set_title(f"{label}\nunary {result['unary_pct']:.1f}% / binary {result['binary_pct']:.1f}%", fontsize=9)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("weight (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _show_image(ax, image: Tensor) -> None:
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray")
    ax.set_title("image", fontsize=8)
    ax.axis("off")


def plot_gate_maps(image: Tensor, maps: list[tuple[str, Tensor]], path: Path) -> None:
    """The image and ``omega`` (mean over channels) of every dynamic LESA layer."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.2 * (len(maps) + 1), 2.6), squeeze=False)
    _show_image(axes[0][0], image)
    for ax, (name, omega) in zip(axes[0][1:], maps):
        shown = ax.imshow(omega.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{name.replace('.conv2', '')}\nmean omega {float(omega.mean()):.2f}", fontsize=7)
        ax.axis("off")
    if maps:
        fig.colorbar(shown, ax=axes[0][1:].tolist(), fraction=0.02)
    _save(fig, path)


def plot_attention_map(image: Tensor, layer: str, weights: Tensor, query: tuple[int, int], path: Path,
                       max_heads: Optional[int] = 8) -> None:
    """The image, the head-averaged attention of one query, and the first heads' maps."""
    plt = _pyplot()
    heads = weights[:max_heads]
    fig, axes = plt.subplots(1, len(heads) + 2, figsize=(2.1 * (len(heads) + 2), 2.5), squeeze=False)
    _show_image(axes[0][0], image)
    panels = [("mean of heads", weights.mean(0))] + [(f"head {i}", w) for i, w in enumerate(heads)]
    for ax, (title, w) in zip(axes[0][1:], panels):
        ax.imshow(w.numpy(), cmap="magma")
        ax.plot(query[1], query[0], "c+", ms=9, mew=2)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{layer}: attention of query (y={query[0]}, x={query[1]})", fontsize=9)
    _save(fig, path)
