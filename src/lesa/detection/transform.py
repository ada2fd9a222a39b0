"""The detectors' input transform (:class:`DetectionTransform`): torchvision's, with semantic maps, multi-scale
training and the image sizes the backbone needs to mask the padding."""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Optional

import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..errors import InputError
from .backbone import mark_image_sizes


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's resize / normalise / batch transform, which also resizes the targets' ``semantic``
    maps (nearest), and can draw each training image's scale: ``train_scales`` is a list of
    ``(probability, low, high)``; a scale ``s`` drawn uniformly from a chosen range resizes the image so
    that its longer side is ``s`` (aspect kept)."""

    def __init__(self, min_size: int, max_size: int, image_mean: list[float], image_std: list[float],
                 train_scales: Optional[Sequence[Sequence[float]]] = None, **kwargs) -> None:
        super().__init__(min_size, max_size, image_mean, image_std, **kwargs)
        self.train_scales = [tuple(s) for s in train_scales or []]

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        """torchvision's transform; the padded batch also carries its images' sizes, for the backbone
        (:func:`~lesa.detection.backbone.mark_image_sizes`: LESA masks the padding)."""
        if not images:  # torchvision would fail with an IndexError deep in its batching
            raise InputError("a detector takes a list of one or more images (each a (3, H, W) tensor); got an empty "
                             "list: call it only when there are images")
        image_list, targets = super().forward(images, targets)
        mark_image_sizes(image_list)
        return image_list, targets

    def draw_scale(self) -> int:
        weights = [p for p, _, _ in self.train_scales]
        _, low, high = random.choices(self.train_scales, weights=weights)[0]
        return int(round(random.uniform(low, high)))

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        if self.training and self.train_scales:
            scale = self.draw_scale()
            sizes = self.min_size, self.max_size
            self.min_size, self.max_size = (scale,), scale  # the longer side becomes `scale`
            try:
                image, target = super().resize(image, target)
            finally:
                self.min_size, self.max_size = sizes
        else:
            image, target = super().resize(image, target)
        if target is not None and "semantic" in target:
            semantic = target["semantic"][None, None].float()
            target["semantic"] = F.interpolate(semantic, size=image.shape[-2:], mode="nearest")[0, 0].long()
        return image, target


__all__ = ["DetectionTransform"]
