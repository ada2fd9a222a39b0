"""Datasets: the embedded digits (and digit scenes for detection), ImageNet-style folders, COCO; the one image
reader (:mod:`lesa.data.images`) they all read files with."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset, default_collate

from .cluttered_digits import ClutteredDigitsDataset
from .digits import DigitsDataset
from .fashion_mnist import FashionMNISTDataset
from .imagefolder import (
    FolderListing,
    TolerantImageFolder,
    check_image_folder,
    collate_skipping_bad,
    list_image_folder,
    scan_image_folders,
)
from .images import image_extensions, read_image, read_label_map
from .transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_train_transform, imagenet_val_transform

# The embedded classification sets: name -> dataset class taking ``(split, img_size, augment=...)`` and
# carrying ``classes``. Each is generated from packaged data, nothing is downloaded.
EMBEDDED: dict[str, type[Dataset]] = {"digits": DigitsDataset, "cluttered-digits": ClutteredDigitsDataset,
                                      "fashion-mnist": FashionMNISTDataset}


@dataclass
class ClassificationData:
    train: Optional[Dataset]
    val: Dataset
    classes: list[str]
    collate: Callable = default_collate
    may_skip: bool = False  # the collate returns (images, targets, n_skipped)


def build_classification_data(data: str, img_size: int, train: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                              std: Sequence[float] = IMAGENET_STD, crop_pct: float = 0.875) -> ClassificationData:
    """An embedded set (:data:`EMBEDDED`, e.g. ``'digits'``; normalised by the set itself) or an ImageFolder
    root with ``train/`` and ``val/`` (normalised with ``mean`` / ``std``, validation centre crop ``crop_pct``;
    the model's :func:`lesa.models.default_cfg` gives them)."""
    if data in EMBEDDED:
        cls = EMBEDDED[data]
        return ClassificationData(
            train=cls("train", img_size, augment=True) if train else None,
            val=cls("val", img_size),
            classes=list(cls.classes),
        )
    listings = scan_image_folders(data)  # the datasets read exactly what was checked
    root = Path(data)
    train_set = (TolerantImageFolder(root / "train", imagenet_train_transform(img_size, mean, std), listings["train"])
                 if train else None)
    val_set = TolerantImageFolder(root / "val", imagenet_val_transform(img_size, crop_pct, mean, std), listings["val"])
    return ClassificationData(train_set, val_set, listings["train"].classes, collate_skipping_bad, may_skip=True)


__all__ = [
    "EMBEDDED",
    "ClassificationData",
    "DigitsDataset",
    "FolderListing",
    "TolerantImageFolder",
    "build_classification_data",
    "check_image_folder",
    "collate_skipping_bad",
    "image_extensions",
    "list_image_folder",
    "read_image",
    "read_label_map",
    "scan_image_folders",
]
