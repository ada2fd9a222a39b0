"""Locally Enhanced Self-Attention: Eq. 5, ``x^{l+1} = m + omega * sum_hw S(...) v``.

``LESA2d`` is a drop-in replacement for a 3x3 convolution (+ its BatchNorm) in a CNN. It sums

* the unary term ``m`` (:class:`~lesa.layers.unary.UnaryConv2d`, Eq. 6),
* the binary term (:class:`~lesa.layers.binary.BinaryAttention2d`, all-to-all attention), weighted by
* the dynamic fusion gate ``omega`` (:class:`~lesa.layers.fusion.DynamicFusionGate`, Eq. 7), or by 1
  with ``fusion='static'`` (the paper's "static LESA", Table 6).

With ``stride > 1`` the output is average-pooled, as in the authors' code. In a padded batch (inside
:func:`~lesa.layers.padding.batch_padding`) the binary term attends only to keys inside each image and both
terms see the input as zero outside it (:meth:`LESA2d.terms`).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .binary import BinaryAttention2d, Impl, PosEmbed
from .checkpointing import checkpointed
from .checks import check_bool, check_choice, check_input, check_int, graph_mode
from .factory import takes_factory_kwargs
from .fusion import DynamicFusionGate
from .padding import KeyMask, padding_valid_size
from .rel_pos import Size2d
from .unary import UnaryConv2d

FUSIONS = ("dynamic", "static")
UNARIES = ("conv", "deform")


class LESA2d(nn.Module):
    """Locally Enhanced Self-Attention over a 2-D feature map.

    Args:
        in_channels, out_channels: channels of the input and of the output.
        heads: attention heads; also the groups of the unary convolution.
        stride: > 1 average-pools the output.
        pos_embed: ``'flat'`` (official classification embedding, fixed map size) or ``'rel2d'``
            (official detection embedding, any map size).
        feature_size: the input map size the position tables are built for (int or ``(H, W)``).
        fusion: ``'dynamic'`` (Eq. 7) or ``'static'`` (plain sum).
        unary: ``'conv'`` or ``'deform'`` (deformable grouped conv, one offset group).
        impl: ``'reference'`` (materialised attention), ``'fused'`` (no ``(HW)^2`` tensor) or ``'auto'``.
        checkpoint: recompute the unary and binary terms in backward to save memory (official ``with_cp``).

    Raises:
        ConfigError: an argument of the wrong type, out of range or not among its choices (one line naming it).
        InputError: (forward) an input that is not ``(N, in_channels, H, W)`` of the parameters' dtype and device.
    """

    @takes_factory_kwargs
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 8,
        stride: int = 1,
        pos_embed: PosEmbed = "flat",
        feature_size: Size2d = 14,
        fusion: Literal["dynamic", "static"] = "dynamic",
        unary: Literal["conv", "deform"] = "conv",
        impl: Impl = "auto",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        check_choice("fusion", fusion, FUSIONS)
        check_choice("unary", unary, UNARIES)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, check_int("stride", stride)
        self.checkpoint = check_bool("checkpoint", checkpoint)
        self.binary = BinaryAttention2d(in_channels, out_channels, heads, pos_embed, feature_size, impl)
        self.unary = UnaryConv2d(in_channels, out_channels, heads, deform=unary == "deform")
        self.fusion_gate = DynamicFusionGate(out_channels) if fusion == "dynamic" else None
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()

    def reset_parameters(self) -> None:
        for part in (self.binary, self.unary, self.fusion_gate):
            if part is not None:
                part.reset_parameters()

    def terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The unary and binary terms ``(m, b)`` at the input resolution.

        In a padded batch (:func:`~lesa.layers.padding.batch_padding`) the input is zeroed outside each image:
        the unary convolution then sees at an image's border what it sees around the image alone (zero
        padding), and the layer's output over the image and its margin does not depend on the batch.
        """
        check_input(x, self.in_channels, "LESA2d", self.binary.qkv.weight)
        if not torch.jit.is_scripting():
            symbolic = graph_mode(x) == "symbolic"  # graphs take no padding (the binary term refuses it there)
            valid = None if symbolic else padding_valid_size(x)
            if valid is not None:
                x = KeyMask.from_valid_size(valid, x.shape[-2], x.shape[-1]).zero_outside(x)
            if self.checkpoint and self.training and not symbolic and x.requires_grad:
                # the recomputation runs in backward, outside the batch's padding context: its mask goes along
                return checkpointed(self.unary, self.unary, x), checkpointed(self.binary, self.binary, x, valid)
            if valid is not None:
                return self.unary(x), self.binary(x, valid)
        return self.unary(x), self.binary(x)

    def forward(self, x: Tensor) -> Tensor:
        unary, binary = self.terms(x)
        if self.fusion_gate is None:
            return self.pool(unary + binary)
        return self.pool(torch.addcmul(unary, self.fusion_gate(unary, binary), binary))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, checkpoint={self.checkpoint}"
