"""Datasets: the embedded digits (and digit scenes for detection), ImageNet-style folders, COCO."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset, default_collate

from .digits import DigitsDataset
from .imagefolder import TolerantImageFolder, check_image_folder, collate_skipping_bad
from .transforms import imagenet_train_transform, imagenet_val_transform

EMBEDDED = ("digits",)


@dataclass
class ClassificationData:
    train: Optional[Dataset]
    val: Dataset
    classes: list[str]
    collate: Callable = default_collate
    may_skip: bool = False  # the collate returns (images, targets, n_skipped)


def build_classification_data(data: str, img_size: int, train: bool = True) -> ClassificationData:
    """``'digits'`` or an ImageFolder root with ``train/`` and ``val/``."""
    if data == "digits":
        return ClassificationData(
            train=DigitsDataset("train", img_size, augment=True) if train else None,
            val=DigitsDataset("val", img_size),
            classes=list(DigitsDataset.classes),
        )
    classes = check_image_folder(data)
    root = Path(data)
    train_set = TolerantImageFolder(root / "train", imagenet_train_transform(img_size)) if train else None
    val_set = TolerantImageFolder(root / "val", imagenet_val_transform(img_size))
    return ClassificationData(train_set, val_set, classes, collate_skipping_bad, may_skip=True)


__all__ = [
    "EMBEDDED",
    "ClassificationData",
    "DigitsDataset",
    "TolerantImageFolder",
    "build_classification_data",
    "check_image_folder",
    "collate_skipping_bad",
]
