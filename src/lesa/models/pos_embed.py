"""Resizing the 2-D relative position tables for another input resolution (fine-tuning, detection).

A ``'rel2d'`` layer already runs at any map size (it crops or interpolates its tables on the fly);
:func:`resize_pos_embed` makes that permanent, so the parameters are the tables used at the new size.
The ``'flat'`` tables are indexed by raster-flattened offsets and have no meaning at another size.
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
    "pos_embed='flat' tables are indexed by raster-flattened offsets and cannot be resized; build the model "
    "for the new size (img_size=...) and train its tables, or use pos_embed='rel2d'"
)


def _scaled(length: int, new: int, old: int) -> int:
    return math.ceil(length * new / old)


def resize_pos_embed(
    model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]],
    new_size: Size2d,
    old_size: Optional[Size2d] = None,
) -> Union[nn.Module, dict[str, Tensor]]:
    """Resize every 2-D relative position table for input images of ``new_size``.

    Each table keeps its ratio to the input: a layer whose maps are ``1/16`` of a 224 input (14) gets
    maps of 18 at 288. Shorter tables keep their central offsets, longer ones are linearly interpolated
    (:func:`lesa.layers.resize_rel_table`). A model is changed in place and returned (its ``img_size``
    too); a state dict is returned as a new dict, and needs ``old_size`` (default 224), the input size
    its tables were built for.
    """
    new_h, new_w = to_2tuple(new_size)
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        old_h, old_w = getattr(model, "img_size", None) or to_2tuple(old_size or 224)
        for name, module in model.named_modules():
            if isinstance(module, FlatRelPosEmbed):
                raise ConfigError(f"{name}: {FLAT_HINT}")
            if isinstance(module, RelPosEmbed2d):
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
def resize_table_module(module: RelPosEmbed2d, feature_size: Size2d) -> None:
    """Replace a layer's height/width tables by their resized versions for ``feature_size`` maps."""
    h, w = to_2tuple(feature_size)
    module.height = nn.Parameter(resize_rel_table(module.height.data, h).clone())
    module.width = nn.Parameter(resize_rel_table(module.width.data, w).clone())
    module.feature_size = (h, w)
