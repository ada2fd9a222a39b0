"""The self-attention (SA) baseline: the binary term alone (Eq. 1 with relative positions).

This is the layer of the paper's "SA" rows (Tables 1, 2, 6): multi-head all-to-all attention with the same
projections, BatchNorms and position embeddings as LESA's binary term, and no unary term or gate.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .binary import BinaryAttention2d, Impl, PosEmbed
from .checkpointing import checkpointed
from .checks import check_bool, check_input, check_int, graph_mode
from .factory import takes_factory_kwargs
from .padding import padding_valid_size
from .rel_pos import Size2d


class SelfAttention2d(nn.Module):
    """The binary term of :class:`~lesa.layers.lesa.LESA2d` alone; arguments, and errors raised, as there."""

    @takes_factory_kwargs
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 8,
        stride: int = 1,
        pos_embed: PosEmbed = "flat",
        feature_size: Size2d = 14,
        impl: Impl = "auto",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, check_int("stride", stride)
        self.checkpoint = check_bool("checkpoint", checkpoint)
        self.binary = BinaryAttention2d(in_channels, out_channels, heads, pos_embed, feature_size, impl)
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()

    def reset_parameters(self) -> None:
        self.binary.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, "SelfAttention2d", self.binary.qkv.weight)
        if not torch.jit.is_scripting():
            if self.checkpoint and self.training and graph_mode(x) != "symbolic" and x.requires_grad:
                # the recomputation runs in backward, outside the batch's padding context: its mask goes along
                valid = padding_valid_size(x)
                return self.pool(checkpointed(self.binary, self.binary, x, valid))
        return self.pool(self.binary(x))
