"""Where an attention layer's output comes from: the unary and binary weight shares (Tables 1 and 2).

* SA: the unary weight is the softmax weight a query gives itself, ``S_ii`` (Eq. 2-3); the binary weight
  is the rest, ``sum_{j != i} S_ij``. Averaged over positions, heads and images.
* LESA: with the fusion gate ``omega`` (Eq. 7) the output is ``m + omega * b``, so the unary and binary
  weights are ``1 / (1 + omega)`` and ``omega / (1 + omega)`` (Table 2's caption), averaged over positions,
  channels and images. Static LESA has ``omega = 1``: 50% / 50%.
* AA: the convolution channels count as unary; the attention channels split as in SA (by channel count).
* Convolutions count as 100% unary.

The model-level figure averages the layers, as the paper does. The SA diagonal is computed in query
blocks, so this works with the fused attention path and never forms the ``(HW)^2`` matrix.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..layers import AttentionAugmentedConv2d, LESA2d, SelfAttention2d
from ..layers.inspection import attention_diagonal
from ..models.resnet import ResNet


def analysis_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, op)`` of the layers the paper analyses.

    For the lesa ResNets: every 3x3 slot of stages 3-4 that the attention models replace (conv ones
    included, for the conv baseline). Otherwise: every LESA / SA / AA layer.
    """
    if isinstance(model, ResNet):
        blocks = [(f"layer3.{i}", b) for i, b in enumerate(model.layer3)][1:]
        blocks += [(f"layer4.{i}", b) for i, b in enumerate(model.layer4)]
        return [(f"{name}.conv2", block.conv2, block.op) for name, block in blocks]
    slots = []
    for name, module in model.named_modules():
        if isinstance(module, LESA2d):
            slots.append((name, module, "lesa" if module.fusion_gate is not None else "static_lesa"))
        elif isinstance(module, SelfAttention2d):
            slots.append((name, module, "sa"))
        elif isinstance(module, AttentionAugmentedConv2d):
            slots.append((name, module, "aa"))
    return slots


class _Mean:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0.0

    def add(self, values: Tensor) -> None:
        self.total += float(values.double().sum())
        self.count += values.numel()

    def add_value(self, value: float, weight: float) -> None:
        self.total += value * weight
        self.count += weight

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")


def _hook(module: nn.Module, op: str, meter: _Mean):
    """Register the forward hook that feeds ``meter`` with this layer's unary weights."""
    if op == "lesa":
        return module.fusion_gate.register_forward_hook(lambda m, args, omega: meter.add(1.0 / (1.0 + omega)))
    if op == "sa":
        return module.binary.register_forward_hook(lambda m, args, out: meter.add(attention_diagonal(m, args[0])))

    if op == "aa":

        def aa_hook(m, args, out):
            own = m.attention_diagonal(args[0])
            share = ((m.out_channels - m.dv) + m.dv * own.double().mean(dim=(1, 2))) / m.out_channels
            meter.add(share)

        return module.register_forward_hook(aa_hook)
    return None


@torch.no_grad()
def unary_binary_shares(
    model: nn.Module, loader: DataLoader, device: Optional[torch.device | str] = None,
    max_batches: Optional[int] = None,
) -> dict[str, Any]:
    """Unary and binary weight percentages per analysed layer and averaged over layers.

    Returns ``{"layers": [{"name", "op", "unary_pct", "binary_pct"}, ...], "unary_pct", "binary_pct"}``;
    unary + binary = 100 for every entry.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    slots = analysis_slots(model)
    meters = {name: _Mean() for name, _, _ in slots}
    handles = [h for name, module, op in slots if (h := _hook(module, op, meters[name])) is not None]
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = batch[0]
            if len(images):
                model(images.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    constant = {"conv": 1.0, "static_lesa": 0.5}
    layers = []
    for name, _, op in slots:
        unary = constant.get(op, meters[name].value)
        layers.append(dict(name=name, op=op, unary_pct=100.0 * unary, binary_pct=100.0 * (1.0 - unary)))
    mean_unary = sum(layer["unary_pct"] for layer in layers) / max(1, len(layers))
    return dict(layers=layers, unary_pct=mean_unary, binary_pct=100.0 - mean_unary)
