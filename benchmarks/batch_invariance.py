"""Batch invariance of the detection backbones: an image alone against the same image batched with a larger one.

torchvision pads the images of a batch to one size (bottom and right, to multiples of 32). For each pair of
sizes below, image ``a`` runs alone (padded to a multiple of 32, as torchvision does) and batched with a
larger image ``b``; on ``a``'s valid region (``ceil(size / stride)`` at each level) we compare

* features: the relative change ``||f_batched - f_alone|| / ||f_alone||`` of the body's stage outputs C2-C5
  and of the FPN outputs (all five levels pooled), which the detection heads see;
* detections: Mask R-CNN's 20 best detections of ``a``, each against the best same-label detection of the
  other run: ``1 - mean IoU``, averaged over both directions (0: the same detections).

Three backbones under the same detector: ``resnet_tiny`` (convolutions only), ``lesa_resnet_tiny`` as it
runs now (the padding masked, ``LesaFPNBackbone`` told each image's size by the detector's transform) and
``lesa_resnet_tiny`` unmasked (the backbone not told: every layer attends to the padding, as before).
Random weights (``--seeds``, averaged), eval mode with the BatchNorms' default running statistics (mean 0,
variance 1; ``--bn calibrated`` re-estimates them first on four unpadded images). Images: smooth random
colour fields with pixel noise, at the listed sizes (the transform's resize is skipped).

    python benchmarks/batch_invariance.py --out docs/figures/batch_invariance.png      # ~10 min on 2 CPU cores
    python benchmarks/batch_invariance.py --bn calibrated --no-detections               # ~3 min
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from lesa.detection import build_maskrcnn

PAIRS = [((320, 400), (512, 480)), ((256, 256), (384, 512)), ((288, 448), (448, 320)), ((224, 320), (512, 512))]
VARIANTS = {  # label: (backbone, padding masked)
    "conv (resnet_tiny)": ("resnet_tiny", True),
    "LESA, unmasked (before)": ("lesa_resnet_tiny", False),
    "LESA, masked (now)": ("lesa_resnet_tiny", True),
}
STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
FPN_STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
TOP_DETECTIONS = 20


def smooth_image(height: int, width: int, gen: torch.Generator) -> Tensor:
    """A ``(3, H, W)`` image in [0, 1]: a bilinearly upsampled coarse random field plus pixel noise."""
    coarse = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=gen)
    field = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (field + 0.05 * torch.randn(3, height, width, generator=gen)).clamp(0, 1)


def build(backbone: str, masked: bool, seed: int, calibrate: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = build_maskrcnn(backbone, num_classes=11, min_size=256, max_size=512).eval()
    model.transform.resize = lambda image, target=None: (image, target)  # keep the listed sizes
    model.roi_heads.detections_per_img = TOP_DETECTIONS
    model.backbone.attends = masked  # False: the backbone does not open the padding context (as before)
    if calibrate:
        calibrate_batch_norms(model, torch.Generator().manual_seed(1000 + seed))
    return model


@torch.no_grad()
def calibrate_batch_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Running statistics of every backbone BatchNorm re-estimated (cumulative average, train mode) on four
    unpadded images (sizes multiples of 32), then eval mode again."""
    norms = [m for m in model.backbone.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for height, width in ((256, 320), (320, 256), (288, 288), (352, 224)):
        images, _ = model.transform([smooth_image(height, width, gen)])
        model.backbone.body.forward_intermediates(images.tensors, intermediates_only=True)
    model.eval()


@torch.no_grad()
def features(model: nn.Module, images: list[Tensor]) -> dict[str, Tensor]:
    """The first image's body stages C2-C5 and FPN levels, as the detector computes them for ``images``."""
    batch, _ = model.transform(images)
    captured = {}
    hook = model.backbone.fpn.register_forward_pre_hook(lambda _, args: captured.update(body=args[0]))
    try:
        fpn = model.backbone(batch.tensors)
    finally:
        hook.remove()
    out = {name: f[0] for name, f in zip(STRIDES, captured["body"].values())}
    out.update({f"P{key}": f[0] for key, f in fpn.items()})
    return out


def relative_change(alone: dict[str, Tensor], batched: dict[str, Tensor], size: tuple[int, int],
                    names: dict[str, int]) -> float:
    """``||batched - alone|| / ||alone||`` over the valid regions of the named maps, pooled."""
    diff = norm = 0.0
    for name, stride in names.items():
        rows, cols = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        a, b = alone[name][:, :rows, :cols], batched[name][:, :rows, :cols]
        diff += float((b - a).square().sum())
        norm += float(a.square().sum())
    return math.sqrt(diff / norm)


def detection_change(alone: dict[str, Tensor], batched: dict[str, Tensor]) -> float:
    """``1 - mean IoU`` of each detection with the best same-label one of the other run, both directions."""
    def one_way(x: dict[str, Tensor], y: dict[str, Tensor]) -> float:
        if len(x["boxes"]) == 0:
            return 0.0 if len(y["boxes"]) == 0 else 1.0
        if len(y["boxes"]) == 0:
            return 1.0
        same = x["labels"][:, None] == y["labels"][None, :]
        return float(1 - (box_iou(x["boxes"], y["boxes"]) * same).max(1).values.mean())
    return (one_way(alone, batched) + one_way(batched, alone)) / 2


def measure(model: nn.Module, small: Tensor, large: Tensor, detections: bool) -> dict[str, float]:
    size = tuple(small.shape[-2:])
    alone, batched = features(model, [small]), features(model, [small, large])
    row = {name: relative_change(alone, batched, size, {name: stride}) for name, stride in STRIDES.items()}
    row["FPN"] = relative_change(alone, batched, size, {f"P{k}": s for k, s in FPN_STRIDES.items()})
    if detections:
        with torch.no_grad():
            row["detections"] = detection_change(model([small])[0], model([small, large])[0])
    return row


def run(seeds: int, calibrate: bool, detections: bool) -> dict[str, dict[str, dict[str, float]]]:
    """``results[pair][variant][metric]``, each the mean over the seeds."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, (backbone, masked) in VARIANTS.items():
        for seed in range(seeds):
            model = build(backbone, masked, seed, calibrate)
            for small_size, large_size in PAIRS:
                gen = torch.Generator().manual_seed(small_size[0] * 1000 + small_size[1])
                small, large = smooth_image(*small_size, gen), smooth_image(*large_size, gen)
                start = time.perf_counter()
                row = measure(model, small, large, detections)
                key = f"{small_size[0]}x{small_size[1]} with {large_size[0]}x{large_size[1]}"
                print(f"{label:24s} seed {seed} {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
                      + f" ({time.perf_counter() - start:.0f} s)", flush=True)
                acc = results.setdefault(key, {}).setdefault(label, {})
                for metric, value in row.items():
                    acc[metric] = acc.get(metric, 0.0) + value / seeds
    return results


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    metrics = list(next(iter(next(iter(results.values())).values())))
    lines = ["| image alone vs batched with | backbone | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for pair, by_variant in results.items():
        for label, row in by_variant.items():
            lines.append(f"| {pair} | {label} | " + " | ".join(f"{100 * row[m]:.1f}%" for m in metrics) + " |")
    for label in VARIANTS:
        mean = {m: sum(results[p][label][m] for p in results) / len(results) for m in metrics}
        lines.append(f"| **mean** | {label} | " + " | ".join(f"**{100 * mean[m]:.1f}%**" for m in metrics) + " |")
    return "\n".join(lines)


def figure(results: dict[str, dict[str, dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("C4", "C5", "FPN", "detections") if m in next(iter(next(iter(results.values())).values()))]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), sharey=False)
    width = 0.8 / len(VARIANTS)
    pairs = list(results)
    for ax, metric in zip(axes, metrics):
        for i, label in enumerate(VARIANTS):
            values = [100 * results[p][label][metric] for p in pairs]
            ax.bar([x + (i - 1) * width for x in range(len(pairs))], values, width, label=label)
        ax.set_xticks(range(len(pairs)), [p.replace(" with ", "\nwith ") for p in pairs], fontsize=7)
        ax.set_title({"C4": "stage 3 (C4) features", "C5": "stage 4 (C5) features", "FPN": "FPN features (all levels)",
                      "detections": "detections: 1 - IoU"}[metric], fontsize=10)
        ax.set_ylabel("change alone -> batched (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(VARIANTS), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="random weight draws, averaged")
    parser.add_argument("--bn", choices=["default", "calibrated"], default="default",
                        help="eval-mode BatchNorm statistics: defaults (mean 0, var 1) or re-estimated on 4 images")
    parser.add_argument("--no-detections", action="store_true", help="features only (a minute instead of ten)")
    parser.add_argument("--out", type=Path, help="the figure (PNG)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--load", type=Path, help="table and figure from numbers written by --json, no runs (pass "
                        "the --seeds and --bn they were run with: the figure names them)")
    args = parser.parse_args()
    if args.load:
        results = json.loads(args.load.read_text())
    else:
        results = run(args.seeds, args.bn == "calibrated", not args.no_detections)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.out:
        bn = "default BN statistics" if args.bn == "default" else "BN statistics calibrated on 4 images"
        figure(results, args.out, f"Mask R-CNN, random weights ({args.seeds} seeds), eval mode, {bn}: an image alone "
                                  "vs batched with a larger one, on its valid region")


if __name__ == "__main__":
    main()
