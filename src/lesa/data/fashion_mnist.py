"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, arXiv 1708.07747): 70,000 28x28 grey product photos of 10
classes (Zalando, MIT licence), the real-photograph benchmark that runs on a laptop.

The four standard IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...``, each
gzipped or plain) are looked for, in order, in ``root`` (``--data-root``), ``$LESA_DATA_DIR``, Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), each either directly or in
torchvision's ``FashionMNIST/raw`` layout. ``download=True`` fetches them through torchvision (needs
internet). Splits: ``train`` = 55,000 of the 60,000 training images, ``val`` = the other 5,000 (a fixed
stratified draw, seed 0, for ``best.pt`` selection), ``test`` = the 10,000 test images, reported apart.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from ..errors import ConfigError, DataError, NotFoundError
from .digits import MEAN, STD, GreyImages

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
VAL_IMAGES, SPLIT_SEED = 5000, 0
# IDX magic numbers: 0x0000 08 (unsigned byte) and the number of dimensions
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801
HOW_TO_GET = ("apt-get install dataset-fashion-mnist, or pass --data-root DIR (or set LESA_DATA_DIR) with the "
              "four IDX files, or --download (through torchvision; needs internet)")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array in an IDX file (gzipped or plain): big-endian int32 magic, one int32 per dimension, then
    unsigned bytes.

    Raises:
        DataError: wrong magic number (another IDX type, or not an IDX file), or a file shorter than its
            header says (truncated), or longer.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip raises these on a damaged or truncated stream
        raise DataError(f"{path} cannot be read ({err}); copy the file again ({HOW_TO_GET})") from None
    ndim = magic & 0xFF
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "nothing" if found is None else f"0x{found:08x}"
        raise DataError(f"{path} is not an IDX file of the expected kind (magic {shown}, expected 0x{magic:08x}); "
                        f"copy the file again ({HOW_TO_GET})")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"{path} holds {len(data) - header} bytes of data where its header says {shape} "
                        f"({int(np.prod(shape))}): the file is truncated or damaged; copy it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _candidates(root: Optional[str | Path]) -> list[Path]:
    bases = [Path(root)] if root else []
    if os.environ.get("LESA_DATA_DIR"):
        bases.append(data_dir_from_environment())
    bases.append(DEBIAN_DIR)
    return [d for base in bases for d in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw")]


def data_dir_from_environment() -> Path:
    """``$LESA_DATA_DIR`` as a folder (it may not exist yet: --download creates it).

    Raises:
        ConfigError: it names a file, or a path below a file.
    """
    value = os.environ["LESA_DATA_DIR"]
    path = Path(value).expanduser()
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    if current.exists() and not current.is_dir():
        raise ConfigError(f"LESA_DATA_DIR={value} is {'a file' if current == path else f'below the file {current}'}, "
                          "not a folder: set it to the folder that holds (or will hold) the data files, or unset it")
    return path


def _find(directory: Path, name: str) -> Optional[Path]:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(root: Optional[str | Path] = None, download: bool = False) -> Path:
    """The folder holding the four files (see the module docstring for the search order).

    Raises:
        NotFoundError: none of the places has all four files, naming the three ways to get them.
    """
    names = [name for pair in FILES.values() for name in pair]
    for directory in _candidates(root):
        if all(_find(directory, name) for name in names):
            return directory
    if download:
        from torchvision.datasets import FashionMNIST

        env = data_dir_from_environment() if os.environ.get("LESA_DATA_DIR") else None
        target = Path(root or env or Path.home() / ".cache" / "lesa")
        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
        return target / "FashionMNIST" / "raw"
    looked = ", ".join(str(d) for d in _candidates(root)[::3])
    raise NotFoundError(f"Fashion-MNIST's IDX files were not found (looked in {looked}): {HOW_TO_GET}")


def load_split(split: str, root: Optional[str | Path] = None, download: bool = False) -> tuple[Tensor, Tensor]:
    """``(images (N, 28, 28) in [0, 1], labels (N,))`` of ``split`` (``train``, ``val`` or ``test``).

    Raises:
        DataError: an unknown split, a damaged file, or image and label counts that differ.
    """
    if split not in ("train", "val", "test"):
        raise DataError(f"split must be 'train', 'val' or 'test', got {split!r}")
    directory = find_fashion_mnist(root, download)
    image_name, label_name = FILES["test" if split == "test" else "train"]
    images = read_idx(_find(directory, image_name), IMAGE_MAGIC)
    labels = read_idx(_find(directory, label_name), LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels in the {split} files; the "
                        f"files are from different sets or damaged: copy them again")
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{directory}: label {int(labels.max())} in the {split} files; Fashion-MNIST has 10 classes")
    images = torch.from_numpy(images.astype(np.float32) / 255.0)
    labels = torch.from_numpy(labels.astype(np.int64))
    if split == "test":
        return images, labels
    val = validation_indices(labels)
    keep = val if split == "val" else np.setdiff1d(np.arange(len(labels)), val)
    return images[keep], labels[keep]


def validation_indices(labels: Tensor) -> np.ndarray:
    """A fixed stratified draw of :data:`VAL_IMAGES` training images (a tenth of a smaller set): each class
    in proportion to its size (the standard files: 500 of each class)."""
    count = min(VAL_IMAGES, max(1, len(labels) // 10))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    shuffled = labels.numpy()[order]
    position = np.empty(len(order))  # where each image falls within its class, as a fraction of the class
    for c in np.unique(shuffled):
        members = shuffled == c
        position[members] = (np.arange(members.sum()) + 0.5) / members.sum()
    return np.sort(order[np.argsort(position, kind="stable")[:count]])


class FashionMNISTDataset(GreyImages):
    """Fashion-MNIST at ``img_size`` (bilinear from 28x28), 3 normalised channels; ``augment`` adds random
    crops (padding 2) and horizontal flips: clothes are left-right symmetric, unlike digits."""

    classes = CLASSES
    splits = ("train", "val", "test")
    reads_files = True

    def __init__(self, split: str = "train", img_size: int = 32, augment: bool = False,
                 root: Optional[str | Path] = None, download: bool = False) -> None:
        images, targets = load_split(split, root, download)
        pad = max(1, round(2 * img_size / 28))
        jitter = v2.Compose([v2.RandomCrop(img_size, padding=pad, fill=-MEAN / STD), v2.RandomHorizontalFlip()])
        super().__init__(images, targets, img_size, jitter if augment else None)
