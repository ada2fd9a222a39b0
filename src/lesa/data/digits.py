"""The embedded classification dataset: scikit-learn's handwritten digits.

1,797 real 8x8 grey-level scans of handwritten digits (UCI "Optical Recognition of Handwritten Digits",
shipped inside scikit-learn, so nothing is downloaded). A fixed, stratified 80/20 split (seed 0) gives 1,437
training and 360 validation images; they are upsampled to the model's input size and replicated to 3
channels. Training images get a small random affine jitter.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..errors import DataError

CLASSES = [str(i) for i in range(10)]
SPLIT_SEED = 0
VAL_FRACTION = 0.2
MEAN, STD = 0.5, 0.5


def load_digits_split(split: str) -> tuple[Tensor, Tensor]:
    """``(images (N, 8, 8) in [0, 1], labels (N,))`` of the fixed train or val split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        list(range(len(labels))), test_size=VAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    idx = torch.tensor(train_idx if split == "train" else val_idx)
    return images[idx], labels[idx]


class GreyImages(Dataset):
    """Grey-level images in [0, 1], ``(N, H, W)``, served at ``img_size`` (bilinear), as 3 normalised
    channels, each through ``augment`` when given: the embedded classification sets."""

    classes = CLASSES
    splits: tuple[str, ...] = ("train", "val")
    reads_files = False  # generated from packaged data (no root / download)

    def __init__(self, images: Tensor, targets: Tensor, img_size: int,
                 augment: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        images = images.unsqueeze(1)
        if tuple(images.shape[-2:]) != (img_size, img_size):
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.images = ((images.clamp(0, 1) - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()
        self.targets = targets
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return image, int(self.targets[index])


class DigitsDataset(GreyImages):
    """Digits upsampled to ``img_size``; ``augment`` adds a small random affine jitter."""

    def __init__(self, split: str = "train", img_size: int = 32, augment: bool = False) -> None:
        images, targets = load_digits_split(split)
        jitter = v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), fill=-MEAN / STD)
        super().__init__(images, targets, img_size, jitter if augment else None)
