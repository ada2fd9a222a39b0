"""ImageNet-style folders (``ROOT/train/<class>/*.jpg``, ``ROOT/val/<class>/*.jpg``), checked up front.

One listing (:func:`list_image_folder`) gives both the classes and the samples, for the layout check and
for the dataset alike, so what is checked is what is read:

* a class is a visible sub-folder of the split (a symlinked folder counts); its images are the files below
  it, at any depth, with an extension PIL can open (:func:`lesa.data.images.image_extensions`: ``.jpg``,
  ``.jfif``, ``.png``, ``.webp``, ``.tif``, ...; any case);
* names starting with ``.`` (``.ipynb_checkpoints/``, ``.DS_Store``, ``._x.jpg``) are skipped, folders and
  files alike, so they never become a class or a sample;
* directory symlinks are followed, each real directory once, so a symlink loop is listed once and ends; a
  link from a class folder back up to it or above it is not followed (it would list every class as this one);
* a class folder without images is an error (it would silently never be predicted, and an all-one-class
  validation split scores 100%), not a warning.

Images are read by :func:`lesa.data.images.read_image`. Those it refuses (:class:`lesa.errors.BadImageError`:
undecodable, truncated, over the pixel limit) are skipped, counted and reported instead of stopping a long
run; the trainer fails once they exceed a set fraction of the training set (:func:`collate_skipping_bad`).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset, default_collate

from ..errors import BadImageError, DataError, NotFoundError
from .images import image_extensions, read_image

LAYOUT = "expected ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"


@dataclass(frozen=True)
class FolderListing:
    """The classes of a split folder and its ``(path, class index)`` samples, from one walk."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]


def list_image_folder(split_dir: str | Path) -> FolderListing:
    """The classes (sorted visible sub-folders) and samples of ``split_dir`` (rules in the module docstring).

    Raises :class:`NotFoundError` if the folder is missing and :class:`DataError` if it has no class folders
    or a class folder has no images.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise NotFoundError(f"{str(split_dir)!r} is missing ({LAYOUT})")
    classes = sorted(d.name for d in split_dir.iterdir() if _visible(d.name) and d.is_dir())
    if not classes:
        raise DataError(f"{str(split_dir)!r} has no class folders ({LAYOUT})")
    extensions = image_extensions()
    files = {name: _walk_files(split_dir / name) for name in classes}
    images = {name: [f for f in found if os.path.splitext(f)[1].lower() in extensions] for name, found in files.items()}
    empty = [name for name in classes if not images[name]]
    if len(empty) == len(classes):
        raise DataError(f"{str(split_dir)!r} has class folders but no images ({_extension_hint(extensions)})")
    if empty:
        raise DataError(f"class folder {str(split_dir / empty[0])!r} has no images ({_found(files[empty[0]])}; "
                        f"{_extension_hint(extensions)}){_more(empty)}: add images or remove the folder")
    samples = [(path, index) for index, name in enumerate(classes) for path in images[name]]
    return FolderListing(split_dir, classes, samples)


def scan_image_folders(root: str | Path) -> dict[str, FolderListing]:
    """The listings of ``root/train`` and ``root/val``, validated: the same classes in both, at least two.

    Raises :class:`NotFoundError` for a missing folder and :class:`DataError` for a malformed layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"data folder {str(root)!r} does not exist ({LAYOUT}, or --data digits)")
    listings = {split: list_image_folder(root / split) for split in ("train", "val")}
    train, val = listings["train"].classes, listings["val"].classes
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise DataError(
            "class folders differ between train and val: "
            f"only in train: {only_train[:10] or 'none'}; only in val: {only_val[:10] or 'none'}"
        )
    if len(train) == 1:
        raise DataError(f"{str(root / 'train')!r} has one class folder ({train[0]!r}): a classifier needs "
                        f"at least two ({LAYOUT})")
    return listings


def list_image_folder_root(root: str | Path, split: str) -> FolderListing:
    """The listing of one split of the data folder ``root`` (evaluation reads no other).

    Raises :class:`NotFoundError` for a missing folder and :class:`DataError` for a malformed layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"data folder {str(root)!r} does not exist ({root / split}/<class>/<image>, or --data "
                            "digits)")
    return list_image_folder(root / split)


def check_image_folder(root: str | Path) -> list[str]:
    """Validate the layout (:func:`scan_image_folders`); return the class names."""
    return scan_image_folders(root)["train"].classes


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(folder: Path) -> list[str]:
    """The visible files below ``folder``, sorted per directory; directory symlinks followed, each real
    directory once (a loop is cut where it comes back), and never one that leads back up to ``folder`` or
    above it (``cat/loop -> ..`` would list the other classes' images as this one's)."""
    found, seen = [], set()
    top = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or (dirpath != str(folder) and _is_ancestor(real, top)):
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f)]
    return found


def _is_ancestor(path: str, of: str) -> bool:
    return of == path or of.startswith(path.rstrip(os.sep) + os.sep)


def _extension_hint(extensions: frozenset[str]) -> str:
    return f"no file with one of the {len(extensions)} extensions PIL opens, e.g. .jpg .jpeg .png .webp .tif"


def _found(files: list[str]) -> str:
    """What the folder holds instead, e.g. ``'it holds 12 .heic'``."""
    counts = Counter(os.path.splitext(f)[1].lower() or "(no extension)" for f in files)
    held = ", ".join(f"{n} {ext}" for ext, n in counts.most_common(5))
    return f"it holds {held}" if held else "it is empty"


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more: {', '.join(names[1:6])})" if len(names) > 1 else ""


class TolerantImageFolder(Dataset):
    """An image folder (``root/<class>/**``, listed by :func:`list_image_folder`, or ``listing`` if given)
    whose items are ``(image, class index)``, or ``None`` (with a warning naming the file) for an image
    :func:`read_image` refuses as a :class:`BadImageError`.

    Raises what :func:`list_image_folder` raises; items raise :class:`NotFoundError` for a file removed since
    the listing.
    """

    def __init__(self, root: str | Path, transform: Optional[Callable] = None,
                 listing: Optional[FolderListing] = None) -> None:
        listing = listing or list_image_folder(root)
        self.root, self.transform = str(listing.root), transform
        self.classes, self.samples = listing.classes, listing.samples
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            image = read_image(path)
        except BadImageError as err:
            warnings.warn(f"skipping undecodable image {err.path}: {err.reason}", stacklevel=2)
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
