"""Datasets: the embedded digits (and digit scenes for detection), ImageNet-style folders, COCO; the one image
reader (:mod:`lesa.data.images`) they all read files with."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

from pydantic import Field
from torch.utils.data import Dataset, default_collate

from ..errors import ConfigError
from ..options import ROLE_INPUT, Name, metavar
from .cluttered_digits import ClutteredDigitsDataset
from .digits import DigitsDataset
from .fashion_mnist import FashionMNISTDataset
from .imagefolder import (
    FolderListing,
    TolerantImageFolder,
    check_image_folder,
    collate_skipping_bad,
    list_image_folder,
    list_image_folder_root,
    scan_image_folders,
)
from .images import image_extensions, read_image, read_label_map
from .transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_train_transform, imagenet_val_transform

# The named classification sets: name -> dataset class taking ``(split, img_size, augment=...)`` and carrying
# ``classes``, ``splits`` (``test`` where the set has one, reported apart) and ``reads_files`` (whether it
# reads files from a folder, ``root=`` / ``download=``; the others are generated from packaged data).
EMBEDDED: dict[str, type[Dataset]] = {"digits": DigitsDataset, "cluttered-digits": ClutteredDigitsDataset,
                                      "fashion-mnist": FashionMNISTDataset}
EVAL_SPLITS = ("val", "test")  # what a trained classifier is evaluated on: test where the set has one

# the options of every command that reads a named set: where one read from files finds them, and which split
DataRoot = Annotated[Optional[Name], Field(
    description="fashion-mnist: the folder with its four IDX files, looked in before $LESA_DATA_DIR and Debian's "
                "/usr/share/datasets/fashion-mnist", json_schema_extra={**ROLE_INPUT, **metavar("DIR")})]
Download = Annotated[bool, Field(description="fashion-mnist: download the files through torchvision if not found "
                                             "(needs internet)")]
Split = Annotated[Literal[EVAL_SPLITS], Field(description="the validation split, or the test split of data that has "
                                                          "one (fashion-mnist)")]


def check_source(data: str, root: Optional[str | Path], download: bool) -> None:
    """Raises ConfigError when ``root`` / ``download`` are given for data other than a named set read from files."""
    if (root or download) and not (data in EMBEDDED and EMBEDDED[data].reads_files):
        readers = ", ".join(name for name, cls in EMBEDDED.items() if cls.reads_files)
        raise ConfigError(f"--data-root / --download tell where a named set's files are ({readers}); {data} has "
                          "none to find: drop them")


@dataclass
class ClassificationData:
    train: Optional[Dataset]
    val: Dataset
    classes: list[str]
    collate: Callable = default_collate
    may_skip: bool = False  # the collate returns (images, targets, n_skipped)
    test: Optional[Callable[[], Dataset]] = None  # the test split, built when asked for (reported apart)


def build_classification_data(data: str, img_size: int, train: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                              std: Sequence[float] = IMAGENET_STD, crop_pct: float = 0.875,
                              root: Optional[str | Path] = None, download: bool = False) -> ClassificationData:
    """A named set (:data:`EMBEDDED`, e.g. ``'digits'``, ``'fashion-mnist'``; normalised by the set itself) or
    an ImageFolder root with ``train/`` and ``val/`` (``val/`` alone when ``train`` is false; normalised with
    ``mean`` / ``std``, validation centre crop ``crop_pct``; the model's :func:`lesa.models.default_cfg` gives
    them). ``root`` / ``download``: where a set that reads files (``reads_files``) looks first, and whether it
    may download them.

    Raises:
        ConfigError: ``root`` or ``download`` for data that reads no such files.
    """
    check_source(data, root, download)
    if data in EMBEDDED:
        cls = EMBEDDED[data]
        source = dict(root=root, download=download) if cls.reads_files else {}
        return ClassificationData(
            train=cls("train", img_size, augment=True, **source) if train else None,
            val=cls("val", img_size, **source),
            classes=list(cls.classes),
            test=(lambda: cls("test", img_size, **source)) if "test" in cls.splits else None,
        )
    root = Path(data)
    # the datasets read exactly what was checked; evaluation lists (and needs) its split alone
    listings = scan_image_folders(data) if train else {"val": list_image_folder_root(root, "val")}
    train_set = (TolerantImageFolder(root / "train", imagenet_train_transform(img_size, mean, std), listings["train"])
                 if train else None)
    val_set = TolerantImageFolder(root / "val", imagenet_val_transform(img_size, crop_pct, mean, std), listings["val"])
    return ClassificationData(train_set, val_set, listings["val"].classes, collate_skipping_bad, may_skip=True)


__all__ = [
    "EMBEDDED",
    "EVAL_SPLITS",
    "ClassificationData",
    "DataRoot",
    "Download",
    "Split",
    "DigitsDataset",
    "FolderListing",
    "TolerantImageFolder",
    "build_classification_data",
    "check_source",
    "check_image_folder",
    "collate_skipping_bad",
    "image_extensions",
    "list_image_folder",
    "list_image_folder_root",
    "read_image",
    "read_label_map",
    "scan_image_folders",
]
