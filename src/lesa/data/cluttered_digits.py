"""Cluttered digits: a harder embedded classification set, generated from the real digits.

In the spirit of cluttered MNIST (Mnih et al. 2014; Jaderberg et al. 2015): each image is a 32x32 canvas
holding one complete handwritten digit from scikit-learn's set (the label) at a random place and scale,
among distractor fragments cut from other digits of the same split, so that local evidence alone is
ambiguous: a fragment can look like part of any digit, and only the whole, context-consistent shape says
which digit is the target.

- canvas: 32x32 (the ``*_resnet_tiny`` models' input; other ``img_size`` values resize it bilinearly);
- target: the 8x8 scan upsampled (bilinear) to a random side of 12-18 pixels, anywhere on the canvas;
- distractors: 4 fragments, each a random square window of 3-4 source pixels (38-50% of a digit's side)
  of another digit, drawn at the target's scale, anywhere on the canvas (they may overlap the target);
  windows with little ink are redrawn;
- everything is combined by a pixel-wise maximum, in [0, 1], then normalised like the digits (mean/std 0.5)
  and replicated to 3 channels;
- sizes: 2 canvases per training digit (2,874) and 3 per validation digit (1,080); train canvases use only
  the digits split's training digits, val canvases only its validation digits (targets and fragments);
- generation uses its own seeded NumPy generator (never torch's global RNG) and takes about a second; it
  is cached per process. ``augment`` (training) adds a random 2-pixel pad-and-crop shift.
"""
from __future__ import annotations

from functools import cache
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from .digits import MEAN, SPLIT_SEED, STD, VAL_FRACTION, GreyImages

CANVAS = 32
TARGET_SIDES = (12, 18)  # inclusive range of the target's side in pixels
FRAGMENT_SOURCE_SIDES = (3, 4)  # inclusive range of a fragment's side in source (8x8) pixels
DISTRACTORS = 4
MIN_FRAGMENT_INK = 0.2  # mean intensity a fragment window needs (else it is redrawn)
COPIES = {"train": 2, "val": 3}
GENERATION_SEED = 14
SHIFT_PIXELS = 2  # augmentation: random shift of up to this many pixels (at 32 px)


class ClutteredSplit(NamedTuple):
    images: Tensor  # (N, CANVAS, CANVAS) float32 in [0, 1]
    targets: Tensor  # (N,) long
    target_source: Tensor  # (N,) index of the target digit in scikit-learn's 1,797 digits
    distractor_sources: Tensor  # (N, DISTRACTORS) indices of the digits the fragments come from
    target_boxes: Tensor  # (N, 4) x0, y0, x1, y1 of the target on the canvas


def split_indices(split: str) -> np.ndarray:
    """Indices into scikit-learn's digits of the fixed train or val split (the same as :mod:`.digits`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    labels = load_digits().target
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=VAL_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return np.asarray(train_idx if split == "train" else val_idx)


def _bilinear_matrix(out_size: int, in_size: int = 8) -> np.ndarray:
    """``(out_size, in_size)`` matrix of bilinear upsampling (half-pixel centres, edges clamped)."""
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        x = min(max((i + 0.5) * in_size / out_size - 0.5, 0.0), in_size - 1.0)
        lo = int(np.floor(x))
        hi = min(lo + 1, in_size - 1)
        matrix[i, lo] += 1.0 - (x - lo)
        matrix[i, hi] += x - lo
    return matrix


@cache
def generate_split(split: str) -> ClutteredSplit:
    """The canvases of one split, deterministic (cached per process)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    sources = split_indices(split)
    scans = digits.images[sources].astype(np.float64) / 16.0
    labels = digits.target[sources]
    rng = np.random.default_rng([GENERATION_SEED, 0 if split == "train" else 1])
    lo, hi = TARGET_SIDES
    up = {side: _bilinear_matrix(side) for side in range(lo, hi + 1)}

    n = len(sources) * COPIES[split]
    images = np.zeros((n, CANVAS, CANVAS))
    targets = np.zeros(n, dtype=np.int64)
    target_source = np.zeros(n, dtype=np.int64)
    distractor_sources = np.zeros((n, DISTRACTORS), dtype=np.int64)
    boxes = np.zeros((n, 4), dtype=np.int64)
    for k in range(n):
        index = k % len(sources)
        side = int(rng.integers(lo, hi + 1))
        matrix = up[side]
        canvas = images[k]
        for d in range(DISTRACTORS):
            for _attempt in range(20):
                other = int(rng.integers(len(sources) - 1))
                other += other >= index  # any digit but the target itself
                w = int(rng.integers(FRAGMENT_SOURCE_SIDES[0], FRAGMENT_SOURCE_SIDES[1] + 1))
                sy, sx = (int(v) for v in rng.integers(0, 8 - w + 1, size=2))
                if scans[other, sy : sy + w, sx : sx + w].mean() >= MIN_FRAGMENT_INK:
                    break
            # the window of the other digit drawn at the target's scale
            big = matrix @ scans[other] @ matrix.T
            y0, x0 = round(sy * side / 8), round(sx * side / 8)
            y1, x1 = round((sy + w) * side / 8), round((sx + w) * side / 8)
            fragment = big[y0:y1, x0:x1]
            py = int(rng.integers(0, CANVAS - fragment.shape[0] + 1))
            px = int(rng.integers(0, CANVAS - fragment.shape[1] + 1))
            region = canvas[py : py + fragment.shape[0], px : px + fragment.shape[1]]
            np.maximum(region, fragment, out=region)
            distractor_sources[k, d] = sources[other]
        ty, tx = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
        region = canvas[ty : ty + side, tx : tx + side]
        np.maximum(region, matrix @ scans[index] @ matrix.T, out=region)
        targets[k], target_source[k] = labels[index], sources[index]
        boxes[k] = (tx, ty, tx + side, ty + side)
    return ClutteredSplit(
        torch.from_numpy(np.clip(images, 0, 1).astype(np.float32)),
        torch.from_numpy(targets),
        torch.from_numpy(target_source),
        torch.from_numpy(distractor_sources),
        torch.from_numpy(boxes),
    )


class ClutteredDigitsDataset(GreyImages):
    """Cluttered digit canvases (see the module docstring) at ``img_size``, 3 channels, normalised;
    ``augment`` shifts them by a few pixels."""

    def __init__(self, split: str = "train", img_size: int = CANVAS, augment: bool = False) -> None:
        data = generate_split(split)
        shift = max(1, round(SHIFT_PIXELS * img_size / CANVAS))
        crop = v2.RandomCrop(img_size, padding=shift, fill=-MEAN / STD)
        super().__init__(data.images, data.targets, img_size, crop if augment else None)
        self.target_source, self.distractor_sources, self.target_boxes = (
            data.target_source, data.distractor_sources, data.target_boxes)
