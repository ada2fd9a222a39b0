"""ImageNet-style folders (``ROOT/train/<class>/*.jpg``, ``ROOT/val/<class>/*.jpg``), checked up front.

Images that cannot be decoded are skipped, counted and reported instead of stopping a long run; the
trainer fails once they exceed a set fraction of the training set (:func:`collate_skipping_bad`). 16-bit
greyscale images keep their contrast (scaled to 8 bits, not clipped).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError, NotFoundError

LAYOUT = "expected ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_image_folder(root: str | Path) -> list[str]:
    """Validate the layout; return the class names. Raises with what is wrong and what is expected."""
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"data folder {str(root)!r} does not exist ({LAYOUT}, or --data digits)")
    classes = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise NotFoundError(f"{str(split_dir)!r} is missing ({LAYOUT})")
        names = _class_dirs(split_dir)
        if not names:
            raise DataError(f"{str(split_dir)!r} has no class folders ({LAYOUT})")
        empty = [n for n in names if not any(p.suffix.lower() in IMG_EXTENSIONS for p in (split_dir / n).iterdir())]
        if len(empty) == len(names):
            raise DataError(f"{str(split_dir)!r} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DataError(
            "class folders differ between train and val: "
            f"only in train: {only_train[:10] or 'none'}; only in val: {only_val[:10] or 'none'}"
        )
    if len(classes["train"]) == 1:
        raise DataError(f"{str(root / 'train')!r} has one class folder ({classes['train'][0]!r}): a classifier needs "
                        f"at least two ({LAYOUT})")
    return classes["train"]


def _load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    if image.mode.startswith("I"):
        # 16-bit greyscale (modes I;16*, or I as PIL often opens them): PIL's convert("RGB") clips values
        # above 255 to white, so scale the full 16-bit range to 8 bits first.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


class TolerantImageFolder(ImageFolder):
    """``ImageFolder`` that returns ``None`` (with a warning) for an image it cannot decode."""

    def __init__(self, root: str | Path, transform: Optional[Callable] = None) -> None:
        super().__init__(str(root), transform=transform, loader=_load_rgb, allow_empty=True)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            warnings.warn(f"skipping undecodable image {path}: {err}", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate the decodable samples; the third element counts the skipped ones."""
    good = [b for b in batch if b is not None]
    bad = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, targets = default_collate(good)
    return images, targets, bad
