"""Attention-augmented convolution (AA; Bello et al., ICCV 2019), the parallel baseline of Table 6.

The output concatenates a 3x3 convolution with ``out - dv`` channels and multi-head self-attention with
``dv`` channels: ``qkv`` by a 1x1 conv, ``softmax(q.k / sqrt(d_k/heads) + 2-D relative logits)``, then a 1x1
output projection. Following Bello et al.'s ResNet-50 setting, ``dk = 2 dv = 0.2 out`` (rounded down to a
multiple of the heads); without biases (ResNet convs have none) this gives Table 6's 25.15M parameters for
AA-ResNet-50. The relative embeddings are the 2-D height/width tables of
:class:`~lesa.layers.rel_pos.RelPosEmbed2d` shared across heads, so the layer runs at any map size and
uses the same fused, linear-memory attention as LESA's 'rel2d' binary term.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .binary import IMPLS, Impl, resolve_auto
from .checks import check_choice, check_divisible, check_input, check_int, check_optional_int, graph_mode
from .factory import takes_factory_kwargs
from .flat_attention import softmax_f32
from .inspection import softmax_diagonal
from .rel2d_attention import augment_rel2d, block_sizes, rel2d_attention
from .rel_pos import RelPosEmbed2d, Size2d


def default_aa_dims(out_channels: int, heads: int) -> tuple[int, int]:
    """``(dk, dv)`` with ``dk = 2 dv = 0.2 out`` rounded down to multiples of ``heads`` (at least ``heads``)."""
    dk = max(heads, int(0.2 * out_channels) // heads * heads)
    dv = max(heads, int(0.1 * out_channels) // heads * heads)
    return dk, dv


class AttentionAugmentedConv2d(nn.Module):
    """AA (see the module docstring). ``dk`` / ``dv``: key and value widths over all heads (default
    :func:`default_aa_dims`); other arguments as :class:`~lesa.layers.lesa.LESA2d`.

    Raises:
        ConfigError: an argument of the wrong type or out of range (``dk``, ``dv`` not multiples of ``heads``,
            ``dv >= out_channels``), or ``impl`` not among its choices.
        InputError: (forward) an input that is not ``(N, in_channels, H, W)`` of the parameters' dtype and device.
    """

    @takes_factory_kwargs
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 8,
        stride: int = 1,
        feature_size: Size2d = 14,
        dk: Optional[int] = None,
        dv: Optional[int] = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        check_choice("impl", impl, IMPLS)
        in_channels, out_channels = check_int("in_channels", in_channels), check_int("out_channels", out_channels)
        heads, stride = check_int("heads", heads), check_int("stride", stride)
        default_dk, default_dv = default_aa_dims(out_channels, heads)
        dk = check_optional_int("dk", dk) or default_dk
        dv = check_optional_int("dv", dv) or default_dv
        why = "each head attends with an equal share"
        check_divisible("dk", dk, "heads", heads, why)
        check_divisible("dv", dv, "heads", heads, why)
        if dv >= out_channels:
            raise ConfigError(f"dv={dv} must be smaller than out_channels={out_channels}")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.dk, self.dv, self.stride, self.impl = dk, dv, stride, impl
        self.conv = nn.Conv2d(in_channels, out_channels - dv, 3, stride=stride, padding=1, bias=False)
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=False)
        self.attn_out = nn.Conv2d(dv, dv, 1, bias=False)
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.rel_pos = RelPosEmbed2d(dk // heads, feature_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv, self.qkv, self.attn_out):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.rel_pos.reset_parameters()

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Scaled queries, keys, values ``(N, heads, HW, d)`` and the relative row/column logits."""
        n, _, h, w = x.shape
        dkh, dvh = self.dk // self.heads, self.dv // self.heads
        qkv = self.qkv(x).reshape(n, self.heads, 2 * dkh + dvh, h * w).transpose(-1, -2)
        q, k, v = torch.split(qkv, [dkh, dkh, dvh], dim=-1)
        q = q * dkh**-0.5
        rows, cols = self.rel_pos.rel_logits(q, h, w)
        return q, k, v, rows, cols

    def attention(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        q, k, v, rows, cols = self.project(x)
        if torch.jit.is_scripting():  # TorchScript and torch.fx graphs: the reference path
            out = self.attend_reference(q, k, v, rows, cols)
        elif graph_mode(x) == "symbolic" or self.resolve_impl(h, w) == "reference":
            out = self.attend_reference(q, k, v, rows, cols)
        else:
            out = rel2d_attention(q, k, v, rows, cols)
        return self.attn_out(out.transpose(-1, -2).reshape(n, self.dv, h, w))

    def resolve_impl(self, height: int, width: int) -> str:
        return resolve_auto("rel2d", height * width) if self.impl == "auto" else self.impl

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        logits = q @ k.transpose(-1, -2) + (rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)
        return softmax_f32(logits).to(v.dtype) @ v

    @torch.no_grad()
    def attention_diagonal(self, x: Tensor) -> Tensor:
        """``p_ii`` of the attention channels, ``(N, heads, H'*W')`` (on the pooled input if strided)."""
        x = self.pool(x)
        q, k, _, rows, cols = self.project(x)
        q_aug, k_aug = augment_rel2d(q, k, rows, cols)
        block = block_sizes(q.device, q.dtype, q.shape[0] * q.shape[1], q.shape[-2]).queries  # the device's policy
        return softmax_diagonal(lambda a, b: q_aug[:, :, a:b] @ k_aug.transpose(-1, -2), q.shape[-2], block)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, "AttentionAugmentedConv2d", self.qkv.weight)
        return torch.cat([self.conv(x), self.attention(self.pool(x))], dim=1)

    def extra_repr(self) -> str:
        return f"dk={self.dk}, dv={self.dv}, heads={self.heads}, stride={self.stride}, impl={self.impl!r}"
