"""Digit scenes: the embedded detection / instance-segmentation dataset.

Real handwriting from scikit-learn's digits (the classification split's train digits for the train
scenes, val digits for the val scenes) placed on canvases of 160-288 pixels a side (rarely square):
2-6 digits per image, each scaled to 24-96 pixels with a random aspect, drawn in a dark random colour on a
light, noisy gradient. A digit's mask is its strokes (upsampled intensity above 35%), its box the mask's
extent; the categories are ``'0'``-``'9'``. Generation is deterministic (seeded) and written in COCO format:
``ROOT/train.json``, ``ROOT/val.json``, ``ROOT/train/*.png``, ``ROOT/val/*.png``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .coco import encode_mask, write_coco
from .digits import load_digits_split

VERSION = 1
CATEGORIES = [dict(id=i + 1, name=str(i), supercategory="digit") for i in range(10)]
DEFAULT_COUNTS = {"train": 400, "val": 80}


def default_root() -> Path:
    base = os.environ.get("LESA_DATA_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lesa"
    return Path(base) / f"digit_scenes_v{VERSION}"


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], limit: float = 0.05) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        if inter > limit * min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0)):
            return True
    return False


def render_scene(rng: np.random.Generator, digits: torch.Tensor, labels: torch.Tensor):
    """One canvas (H, W, 3 uint8) and its instances ``[(label, mask (H, W) bool), ...]``."""
    height, width = (int(v) for v in rng.integers(160, 289, size=2))
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(190, 240, size=3)
    tilt = rng.uniform(-30, 30, size=(2, 3))
    canvas = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1] + rng.normal(0, 6, size=(height, width, 3))
    instances, boxes = [], []
    for _ in range(int(rng.integers(2, 7))):
        index = int(rng.integers(len(labels)))
        side = int(rng.integers(24, 97))
        h, w = side, max(12, int(side * rng.uniform(0.75, 1.25)))
        if h >= height or w >= width:
            continue
        for _attempt in range(20):
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            if not _overlaps((x, y, x + w, y + h), boxes):
                break
        else:
            continue
        alpha = F.interpolate(digits[index][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        alpha = (alpha / alpha.max().clamp_min(1e-6)).clamp(0, 1).numpy()
        colour = rng.uniform(0, 110, size=3)
        region = canvas[y : y + h, x : x + w]
        canvas[y : y + h, x : x + w] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((height, width), dtype=bool)
        mask[y : y + h, x : x + w] = alpha > 0.35
        if mask.sum() < 20:
            continue
        boxes.append((x, y, x + w, y + h))
        instances.append((int(labels[index]), mask))
    return np.clip(canvas, 0, 255).astype(np.uint8), instances


def generate_split(root: Path, split: str, count: int, seed: int) -> None:
    digits, labels = load_digits_split(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        canvas, instances = render_scene(rng, digits, labels)
        file_name = f"{image_id:05d}.png"
        Image.fromarray(canvas).save(root / split / file_name)
        images.append(dict(id=image_id, file_name=file_name, height=canvas.shape[0], width=canvas.shape[1]))
        for label, mask in instances:
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=label + 1, iscrowd=0,
                bbox=[x0, y0, x1 - x0, y1 - y0], area=int(mask.sum()), segmentation=encode_mask(mask),
            ))
    info = dict(description="lesa digit scenes", version=VERSION, seed=seed, count=count)
    write_coco(root / f"{split}.json", images, annotations, CATEGORIES, info)


def ensure_digit_scenes(root: Optional[str | Path] = None, counts: Optional[dict[str, int]] = None,
                        seed: int = 0) -> Path:
    """Generate the dataset under ``root`` (default: ``$LESA_DATA_DIR`` or ``~/.cache/lesa``) unless it is
    already there with the same settings; return ``root``."""
    root = Path(root) if root else default_root()
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    for split, count in counts.items():
        ann = root / f"{split}.json"
        if ann.is_file():
            info = json.loads(ann.read_text()).get("info", {})
            if info.get("seed") == seed and info.get("count") == count and info.get("version") == VERSION:
                continue
        generate_split(root, split, count, seed)
    return root
