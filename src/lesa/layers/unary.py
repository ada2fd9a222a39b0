"""The unary (local) term of LESA: Eq. 6, ``m = x W_g^k W_1^1``.

A grouped ``k x k`` convolution with one group per head (``W_g^k``) followed by a 1x1 projection
(``W_1^1``) that mixes the heads, then BatchNorm, as in the authors' code. With ``deform=True`` the grouped
convolution is deformable with one offset group (Sec. 4.2).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .checks import check_bool, check_divisible, check_input, check_int
from .deform import DeformConv2dPack
from .factory import takes_factory_kwargs


class UnaryConv2d(nn.Module):
    """The unary term (see the module docstring); ``heads`` groups, ``deform``: a deformable grouped conv.

    Raises:
        ConfigError: channels or heads not ints >= 1, channels not multiples of ``heads``, ``deform`` not a bool.
        InputError: (forward) an input that is not ``(N, in_channels, H, W)`` of the parameters' dtype and device.
    """

    @takes_factory_kwargs
    def __init__(self, in_channels: int, out_channels: int, heads: int = 8, deform: bool = False) -> None:
        super().__init__()
        in_channels, out_channels = check_int("in_channels", in_channels), check_int("out_channels", out_channels)
        heads = check_int("heads", heads)
        why = "the unary term is a grouped convolution with one group per head"
        check_divisible("in_channels", in_channels, "heads", heads, why)
        check_divisible("out_channels", out_channels, "heads", heads, why)
        self.in_channels = in_channels
        self.deform = check_bool("deform", deform)
        if deform:
            self.conv: nn.Module = DeformConv2dPack(in_channels, out_channels, 3, padding=1, groups=heads)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=heads, bias=False)
        # With a single head the conv already mixes all channels; the official code then omits W_1^1.
        self.proj = nn.Conv2d(out_channels, out_channels, 1, bias=False) if heads != 1 else None
        self.bn = nn.BatchNorm2d(out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        convs = [self.conv] + ([self.proj] if self.proj is not None else [])
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if self.deform:
            self.conv.reset_offset()

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """Fold ``bn`` (eval statistics) into the last convolution, for inference."""
        if isinstance(self.bn, nn.Identity):
            return
        if self.proj is not None:
            self.proj = fuse_conv_bn_eval(self.proj, self.bn)
        elif isinstance(self.conv, nn.Conv2d):
            self.conv = fuse_conv_bn_eval(self.conv, self.bn)
        else:  # a deformable convolution without the 1x1 projection: keep the BN
            return
        self.bn = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, "UnaryConv2d", self.conv.weight)
        out = self.conv(x)
        if self.proj is not None:
            out = self.proj(out)
        return self.bn(out)
