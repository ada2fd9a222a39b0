"""Resizing the relative position tables for another input resolution (fine-tuning, detection).

A ``'rel2d'`` layer already runs at any map size (it crops or interpolates its tables on the fly);
:func:`resize_pos_embed` makes that permanent, so the parameters are the tables used at the new size.
The ``'flat'`` tables are indexed by raster-flattened offsets, tied to one map size: with ``flat=True`` they
are resized through their 2-D view (:func:`resize_flat_table`), an approximation to start fine-tuning from.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.rel_pos import FlatRelPosEmbed, RelPosEmbed2d, Size2d, resize_rel_table, to_2tuple

FLAT_HINT = (
    "pos_embed='flat' tables are indexed by raster-flattened offsets and cannot be resized exactly; build the model "
    "for the new size (img_size=...) and train its tables, use pos_embed='rel2d', or resize a model's tables with "
    "resize_pos_embed(model, size, flat=True) (an approximation, to start fine-tuning from)"
)


def _scaled(length: int, new: int, old: int) -> int:
    return math.ceil(length * new / old)


def resize_pos_embed(
    model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]],
    new_size: Size2d,
    old_size: Optional[Size2d] = None,
    flat: bool = False,
) -> Union[nn.Module, dict[str, Tensor]]:
    """Resize every relative position table for input images of ``new_size``.

    Each table keeps its ratio to the input: a layer whose maps are ``1/16`` of a 224 input (14) gets
    maps of 18 at 288. Shorter ``'rel2d'`` tables keep their central offsets, longer ones are linearly
    interpolated (:func:`lesa.layers.resize_rel_table`). ``flat=True`` also resizes a model's ``'flat'`` tables
    (:func:`resize_flat_table`). A model is changed in place and returned (its ``img_size`` too); a state dict
    is returned as a new dict, and needs ``old_size`` (default 224), the input size its tables were built for.

    Raises:
        ConfigError: ``'flat'`` tables without ``flat=True``, or in a state dict (their map size is unknown there).
    """
    new_h, new_w = to_2tuple(new_size)
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        old_h, old_w = getattr(model, "img_size", None) or to_2tuple(old_size or 224)
        for name, module in model.named_modules():
            if isinstance(module, (FlatRelPosEmbed, RelPosEmbed2d)):
                if isinstance(module, FlatRelPosEmbed) and not flat:
                    raise ConfigError(f"{name}: {FLAT_HINT}")
                fh, fw = module.feature_size
                resize_table_module(module, (_scaled(fh, new_h, old_h), _scaled(fw, new_w, old_w)))
        if hasattr(model, "img_size"):
            model.img_size = (new_h, new_w)
            if hasattr(model, "pretrained_cfg"):
                model.pretrained_cfg["input_size"] = (model.pretrained_cfg["input_size"][0], new_h, new_w)
        return model
    old_h, old_w = to_2tuple(old_size or 224)
    out = dict(model_or_state_dict)
    for key, table in model_or_state_dict.items():
        if key.endswith("rel_pos.relative"):
            raise ConfigError(f"{key}: {FLAT_HINT}")
        if key.endswith(("rel_pos.height", "rel_pos.width")):
            old_len = (table.shape[0] + 1) // 2
            new_len = _scaled(old_len, new_h, old_h) if key.endswith("height") else _scaled(old_len, new_w, old_w)
            out[key] = resize_rel_table(table, new_len).clone()
    return out


@torch.no_grad()
def resize_table_module(module: Union[RelPosEmbed2d, FlatRelPosEmbed], feature_size: Size2d) -> None:
    """Replace a layer's tables by their resized versions for ``feature_size`` maps."""
    h, w = to_2tuple(feature_size)
    if isinstance(module, FlatRelPosEmbed):
        module.relative = nn.Parameter(resize_flat_table(module.relative.data, module.feature_size, (h, w)).clone())
    else:
        module.height = nn.Parameter(resize_rel_table(module.height.data, h).clone())
        module.width = nn.Parameter(resize_rel_table(module.width.data, w).clone())
    module.feature_size = (h, w)


def resize_flat_table(table: Tensor, old_size: Size2d, new_size: Size2d) -> Tensor:
    """A ``'flat'`` table ``(d, 2hw-1)`` of ``h x w`` maps resized to ``(d, 2HW-1)`` for ``H x W`` maps, through
    its 2-D view.

    The entry the layer uses for the 2-D offset ``(dy, dx)`` is ``table[dy*w + dx]``: that ``(d, 2h-1, 2w-1)``
    table is resized along each axis as the ``'rel2d'`` tables are (:func:`lesa.layers.resize_rel_table`), and
    each new raster offset ``o`` takes the mean of the 2-D offsets it stands for in an ``H x W`` map (one, or
    two: ``(dy, dx)`` and ``(dy+1, dx-W)`` give the same ``o``). At the same size it is the identity.
    """
    (h, w), (new_h, new_w) = to_2tuple(old_size), to_2tuple(new_size)
    dy = torch.arange(-(h - 1), h, device=table.device)
    dx = torch.arange(-(w - 1), w, device=table.device)
    grid = table[:, dy[:, None] * w + dx[None, :] + h * w - 1]  # (d, 2h-1, 2w-1)
    grid = _resize_axis(_resize_axis(grid, 1, new_h), 2, new_w)  # (d, 2H-1, 2W-1)
    offsets = torch.arange(-(new_h * new_w - 1), new_h * new_w, device=table.device)
    col = torch.remainder(offsets, new_w)
    row = torch.div(offsets - col, new_w, rounding_mode="floor")
    total = torch.zeros(table.shape[0], len(offsets), dtype=table.dtype, device=table.device)
    count = torch.zeros(len(offsets), dtype=table.dtype, device=table.device)
    for r, c, valid in ((row, col, row.abs() < new_h), (row + 1, col - new_w, (col > 0) & ((row + 1).abs() < new_h))):
        r, c = r.clamp(-(new_h - 1), new_h - 1), c.clamp(-(new_w - 1), new_w - 1)
        total += grid[:, r + new_h - 1, c + new_w - 1] * valid
        count += valid
    return total / count


def _resize_axis(grid: Tensor, axis: int, length: int) -> Tensor:
    """:func:`resize_rel_table` along ``axis`` of ``grid`` (offsets ``-(L-1)..L-1`` there)."""
    moved = grid.movedim(axis, 0)
    resized = resize_rel_table(moved.flatten(1), length).unflatten(1, moved.shape[1:])
    return resized.movedim(0, axis)
