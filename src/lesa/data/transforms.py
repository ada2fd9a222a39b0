"""ImageNet transforms (the paper's recipe, Sec. 4.1): RandomResizedCrop + flip; resize 256 / crop 224."""
from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_train_transform(img_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(img_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def imagenet_val_transform(img_size: int = 224, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                           std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct))),  # 256 for 224
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
