"""Per-image views inside a model: the fusion gate ``omega`` per LESA layer and one query's attention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import LESA2d, SelfAttention2d
from ..layers.inspection import attention_row


@torch.no_grad()
def gate_maps(model: nn.Module, image: Tensor) -> list[tuple[str, Tensor]]:
    """``omega`` averaged over channels, ``(H, W)`` per dynamic LESA layer, for one ``(C, H, W)`` image."""
    maps, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, LESA2d) and module.fusion_gate is not None:
            handles.append(module.fusion_gate.register_forward_hook(
                lambda m, args, omega, name=name: maps.append((name, omega[0].mean(0).float().cpu()))))
    was_training = model.training
    model.eval()
    try:
        model(image.unsqueeze(0).to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return maps


def attention_layers_with_maps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers whose binary term can show an attention map (SA and LESA)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LESA2d, SelfAttention2d))]


@torch.no_grad()
def attention_map(model: nn.Module, image: Tensor, layer: Optional[str] = None,
                  query: Optional[tuple[int, int]] = None) -> tuple[str, Tensor, tuple[int, int]]:
    """The attention of one query over the whole map, ``(heads, H, W)``, in ``layer`` (default: the
    first SA/LESA layer) at ``query = (y, x)`` (default: the centre). Returns (layer, map, query)."""
    layers = dict(attention_layers_with_maps(model))
    if not layers:
        raise ConfigError("the model has no SA / LESA layer to show an attention map of")
    name = layer or next(iter(layers))
    if name not in layers:
        raise ConfigError(f"no SA / LESA layer named {name!r}; choose one of {sorted(layers)}")
    captured: dict[str, Tensor] = {}
    binary = layers[name].binary
    handle = binary.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    was_training = model.training
    model.eval()
    try:
        model(image.unsqueeze(0).to(next(model.parameters()).device))
        x = captured["x"]
        height, width = x.shape[-2:]
        y, xq = query if query is not None else (height // 2, width // 2)
        if not (0 <= y < height and 0 <= xq < width):
            raise ConfigError(f"query {(y, xq)} is outside the {height}x{width} map of {name}")
        weights = attention_row(binary, x, y * width + xq)[0]
    finally:
        handle.remove()
        model.train(was_training)
    return name, weights.reshape(-1, height, width).cpu(), (y, xq)
