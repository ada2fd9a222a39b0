"""Deformable 3x3 convolution that predicts its own offsets (Dai et al. 2017), on torchvision.

The paper makes LESA's unary convolution deformable for detection (Sec. 4.2, one offset group) and uses
deformable convolutions in stages 2-4 as its strongest detection baseline. ``torchvision.ops.DeformConv2d``
takes the offsets as an input; this module adds the offset predictor. Parameter names follow mmcv's
``DeformConv2dPack`` (``weight``, ``conv_offset.weight``, ``conv_offset.bias``), so the authors'
detection checkpoints map onto it directly.
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from .checks import check_bool, check_divisible, check_input, check_int
from .factory import takes_factory_kwargs


class DeformConv2dPack(DeformConv2d):
    """``DeformConv2d`` whose offsets come from a zero-initialised conv on the same input.

    Raises:
        ConfigError: a size that is not an int in range (channels, kernel, stride, dilation, groups >= 1,
            padding >= 0), channels not multiples of ``groups``, ``in_channels`` not of ``offset_groups``.
        InputError: (forward) an input that is not ``(N, in_channels, H, W)`` of the parameters' dtype and device.
    """

    @takes_factory_kwargs
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = False,
    ) -> None:
        check_deform_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, offset_groups)
        check_bool("bias", bias)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.offset_groups = offset_groups
        self.conv_offset = nn.Conv2d(
            in_channels,
            offset_groups * 2 * kernel_size * kernel_size,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=True,
        )
        self.reset_offset()

    def reset_offset(self) -> None:
        # Zero offsets: the layer starts as a plain convolution.
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, "DeformConv2dPack", self.weight)
        return super().forward(x, self.conv_offset(x))


def check_deform_args(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                      dilation: int, groups: int, offset_groups: int) -> None:
    """:class:`DeformConv2dPack`'s sizes (square kernels, strides, paddings and dilations: ints)."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("kernel_size", kernel_size),
                        ("stride", stride), ("dilation", dilation), ("groups", groups),
                        ("offset_groups", offset_groups)):
        check_int(name, value)
    check_int("padding", padding, minimum=0)
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        check_divisible(name, value, "groups", groups, "a grouped convolution splits the channels evenly")
    check_divisible("in_channels", in_channels, "offset_groups", offset_groups,
                    "each offset group deforms an equal share of the input channels")
