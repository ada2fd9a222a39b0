"""Padded batches: which part of each map is image.

torchvision pads the images of a detection batch to one size, at the bottom and right. This module describes
that padding to the attention layers: :class:`BatchPadding`, the images' sizes for the whole network (the
:func:`batch_padding` context the detection backbone opens); :class:`KeyMask`, the part inside on one map;
the checks of a caller's ``valid_size``; and :func:`masked_norm`, a BatchNorm whose batch statistics count
only what lies inside. What the binary term does with a mask: :mod:`lesa.layers.binary`.
"""
# no ``from __future__ import annotations``: TorchScript reads KeyMask's field types (the reference path's
# methods take an optional mask in their signatures), and it cannot resolve them as strings
import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..errors import InputError
from .bn_moments import masked_batch_norm
from .checks import describe


class KeyMask(NamedTuple):
    """The part of each image in a padded ``H x W`` map: the top-left ``h x w``. ``rows``: ``(N, H)`` and
    ``cols``: ``(N, W)`` bool, True for the rows / columns inside."""

    rows: Tensor
    cols: Tensor

    @staticmethod
    def from_valid_size(valid_size: Tensor, height: int, width: int) -> "KeyMask":
        """From ``(N, 2)`` valid ``(h, w)``, each at least 1 (an image has a pixel; larger: the whole map)."""
        valid = valid_size.clamp(min=1)
        rows = torch.arange(height, device=valid.device) < valid[:, :1]
        cols = torch.arange(width, device=valid.device) < valid[:, 1:]
        return KeyMask(rows, cols)

    def positions(self) -> Tensor:
        """``(N, H*W)`` bool in raster order: the positions (queries and keys) inside the image."""
        return self.inside().flatten(1)

    def pairs(self) -> Tensor:
        """``(N, 1, HW, HW)`` bool: the (query, key) pairs with both inside the image."""
        inside = self.positions()
        return (inside.unsqueeze(-1) & inside.unsqueeze(-2)).unsqueeze(1)

    def inside(self) -> Tensor:
        """``(N, H, W)`` bool: the map positions inside the image."""
        return self.rows.unsqueeze(-1) & self.cols.unsqueeze(-2)

    def zero_outside(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` with zeros outside the images (what a convolution sees beyond an image alone)."""
        return x.masked_fill(~self.inside().unsqueeze(1), 0)


@dataclass(frozen=True)
class BatchPadding:
    """Each image's size in a padded batch, for the layers inside :func:`batch_padding`.

    ``sizes``: ``(N, 2)`` integer ``(height, width)`` of the images in input pixels, on the batch's device;
    ``padded``: the padded batch's ``(H, W)``.
    """

    sizes: Tensor
    padded: tuple[int, int]

    def valid_size(self, height: int, width: int) -> Tensor:
        """``(N, 2)`` valid size on a ``height x width`` map of the batch: ``ceil(h * height / H)``, which is
        ``ceil(h / stride)`` where the stride divides ``H`` (torchvision pads to multiples of 32)."""
        pad_h, pad_w = self.padded
        return torch.stack([(self.sizes[:, 0] * height + pad_h - 1) // pad_h,
                            (self.sizes[:, 1] * width + pad_w - 1) // pad_w], dim=1)


# The padding of the batch being run, for layers whose callers (timm, torch.fx, export) pass only ``x``. A
# context variable: each thread (and asyncio task) sees its own; torch.compile reads it and guards on it.
_BATCH_PADDING: ContextVar[Optional[BatchPadding]] = ContextVar("lesa_batch_padding", default=None)


@contextlib.contextmanager
def batch_padding(image_sizes: Tensor, padded_size: Sequence[int]) -> Iterator[BatchPadding]:
    """Within the block, every 'rel2d' attention layer run in this thread masks the padding of the batch
    (see the module docstring): ``image_sizes`` ``(N, 2)`` integer ``(height, width)`` of the images in the
    padded input of size ``padded_size`` ``(H, W)``; each layer converts them to its own map size
    (:meth:`BatchPadding.valid_size`). Layers with ``checkpoint=True`` take the mask into their recomputation.
    A 'flat' layer raises :class:`~lesa.errors.ConfigError`.
    """
    padding = BatchPadding(image_sizes, (int(padded_size[0]), int(padded_size[1])))
    token = _BATCH_PADDING.set(padding)
    try:
        yield padding
    finally:
        _BATCH_PADDING.reset(token)


def in_batch_padding() -> bool:
    """Whether a :func:`batch_padding` block is open in this thread."""
    return _BATCH_PADDING.get() is not None


def padding_valid_size(x: Tensor) -> Optional[Tensor]:
    """The valid sizes ``(N, 2)`` on the map ``x`` ``(N, C, H, W)`` inside :func:`batch_padding` (on ``x``'s
    device), else ``None``."""
    padding = _BATCH_PADDING.get()
    return None if padding is None else padding.valid_size(x.shape[-2], x.shape[-1]).to(x.device)


def check_valid_size(valid_size: object, x: Tensor) -> Tensor:
    """An ``(N, 2)`` integer tensor for the batch ``x``, on its device.

    Raises:
        InputError: anything else, naming the expected shape.
    """
    if not isinstance(valid_size, Tensor):
        got = describe(valid_size)
    elif valid_size.shape != (x.shape[0], 2) or valid_size.is_floating_point() or valid_size.is_complex() \
            or valid_size.dtype == torch.bool:
        got = f"a {valid_size.dtype} tensor of shape {tuple(valid_size.shape)}"
    else:
        return valid_size.to(x.device)
    raise InputError(f"valid_size must be an integer tensor of shape ({x.shape[0]}, 2), each image's valid "
                     f"(height, width) on the map, got {got}")


def padding_mask(x: Tensor, valid_size: object) -> Optional[KeyMask]:
    """The padding of the map ``x`` from ``valid_size`` (checked by :func:`check_valid_size`) or, where that
    is ``None``, from the open :func:`batch_padding`; ``None`` without either."""
    valid = padding_valid_size(x) if valid_size is None else check_valid_size(valid_size, x)
    return None if valid is None else KeyMask.from_valid_size(valid, x.shape[-2], x.shape[-1])


def masked_norm(bn: nn.Module, x: Tensor, mask: Optional[KeyMask]) -> Tensor:
    """``bn`` over an ``(N, C, H, W)`` map; with a ``mask``, batch statistics over the positions inside the
    images, of the local batch for a SyncBatchNorm too (a BN folded for inference is an ``nn.Identity``)."""
    if mask is None or not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return bn(x)
    return masked_batch_norm(bn, x, mask.inside().unsqueeze(1))
