"""Dynamic fusion of the unary and binary terms: Eq. 7, ``omega = sigmoid(F(m || b))``.

``F`` is built as the authors' code builds it (the paper's text describes a pre-activation MLP; the code,
whose checkpoints we load, is): ReLU -> 1x1 conv ``2C -> C`` -> BN -> ReLU -> 1x1 conv ``C -> C`` -> BN,
then the sigmoid. ``omega`` has one weight per channel and position, and LESA outputs
``m + omega * b`` (Eq. 5).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .checks import check_int
from .factory import takes_factory_kwargs


class DynamicFusionGate(nn.Module):
    """``omega`` of Eq. 7 for ``channels``-channel terms; raises :class:`~lesa.errors.ConfigError` unless
    ``channels`` is an int >= 1."""

    @takes_factory_kwargs
    def __init__(self, channels: int) -> None:
        super().__init__()
        channels = check_int("channels", channels)
        self.fc1 = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.fc2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    @torch.no_grad()
    def fold_batch_norms(self) -> None:
        """Fold ``bn1`` / ``bn2`` (eval statistics) into ``fc1`` / ``fc2``, for inference."""
        if isinstance(self.bn1, nn.BatchNorm2d):
            self.fc1, self.bn1 = fuse_conv_bn_eval(self.fc1, self.bn1), nn.Identity()
            self.fc2, self.bn2 = fuse_conv_bn_eval(self.fc2, self.bn2), nn.Identity()

    def forward(self, unary: Tensor, binary: Tensor) -> Tensor:
        """Returns ``omega`` in ``(0, 1)``, shaped like ``binary``."""
        hidden = torch.relu(self.bn1(self.fc1(torch.relu(torch.cat([unary, binary], dim=1)))))
        return torch.sigmoid(self.bn2(self.fc2(hidden)))
