"""LESA ResNet + FPN backbones for torchvision's detectors (Sec. 4.2 of the paper).

Any lesa model (conv, SA, AA, static LESA, LESA; ResNet-50, WRN-50-2, or the tiny widths) with its last
stage at stride 2 (as the authors' detection configs), an FPN over stages 1-4 (strides 4-32) and an extra
max-pooled level (stride 64). As usual for detection the stem and first stage are frozen and BatchNorm
statistics are frozen (``frozen_bn``: BNs stay in eval mode, their affine parameters are not trained,
like torchvision's ``FrozenBatchNorm2d``; LESA's internal BNs then use their running statistics and the
fused path skips the batch moments). The attention layers use the 2-D relative embedding, so images keep
their aspect ratio and sizes may differ per batch.

Padded batches: torchvision's transform pads the images of a batch to one size (at the bottom and right, to
multiples of 32) and passes the backbone only the padded tensor. The detectors' transform
(:class:`~lesa.detection.transform.DetectionTransform`) records each image's size on that tensor
(:func:`mark_image_sizes`); the backbone runs its body inside :func:`~lesa.layers.padding.batch_padding`, so
every attention layer attends only to keys inside each image (its valid size at the layer's stride:
``ceil(size / stride)``). A feature of an image then depends on what it is batched with only through the
convolutions' view of the border, as in a convolutional backbone (``docs/detection.md``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..errors import ConfigError, InputError
from ..layers.binary import BinaryAttention2d
from ..layers.padding import batch_padding
from ..models import create_model
from ..models.resnet import ResNet

# The attribute of a padded batch tensor that holds its images' (height, width): torchvision's detectors call
# the backbone with the tensor alone. On the tensor, it cannot outlive or leave the batch (another thread's,
# a later one), and torch.compile traces it without a graph break.
IMAGE_SIZES_ATTR = "lesa_image_sizes"


def mark_image_sizes(images: ImageList) -> None:
    """Record ``images.image_sizes`` on ``images.tensors`` for :meth:`LesaFPNBackbone.forward`."""
    setattr(images.tensors, IMAGE_SIZES_ATTR, [(int(h), int(w)) for h, w in images.image_sizes])


class LesaFPNBackbone(nn.Module):
    """``body`` (a lesa ResNet without its head) + ``fpn``; ``out_channels`` as torchvision expects."""

    def __init__(self, body: ResNet, out_channels: int = 256, trainable_layers: int = 3,
                 frozen_bn: bool = True) -> None:
        super().__init__()
        if not 0 <= trainable_layers <= 5:
            raise ConfigError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        body.fc = nn.Identity()
        self.body = body
        self.frozen_bn = frozen_bn
        in_channels = [info["num_chs"] for info in body.feature_info]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.attends = any(isinstance(m, BinaryAttention2d) for m in body.modules())  # has padding to mask
        trainable = ["layer4", "layer3", "layer2", "layer1", "stem"][:trainable_layers]
        for name, param in body.named_parameters():
            stage = name.split(".")[0] if name.startswith("layer") else "stem"
            if stage not in trainable:
                param.requires_grad_(False)
        if frozen_bn:
            for module in body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for param in module.parameters():
                        param.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> LesaFPNBackbone:
        super().train(mode)
        if self.frozen_bn:
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: Tensor, image_sizes: Optional[Sequence[tuple[int, int]]] = None) -> OrderedDict[str, Tensor]:
        """FPN levels ``'0'``-``'3'``, ``'pool'`` of the padded batch ``x`` ``(N, 3, H, W)``.

        ``image_sizes``: each image's ``(height, width)`` in the top-left of ``x``; default: those the
        detector's transform recorded on ``x`` (:func:`mark_image_sizes`), else none (no padding masked).
        """
        sizes = image_sizes if image_sizes is not None else getattr(x, IMAGE_SIZES_ATTR, None)
        if sizes is not None and self.attends and any(tuple(s) != tuple(x.shape[-2:]) for s in sizes):
            features = self.padded_features(x, sizes)
        else:  # nothing padded, or no attention layer to tell
            features = self.body.forward_intermediates(x, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))

    def padded_features(self, x: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """The body's stage outputs with every attention layer masking the padding of ``sizes``.

        Raises:
            InputError: ``sizes`` does not give one ``(height, width)`` per image.
            ConfigError: block-level gradient checkpointing in training (its recomputation in the backward
                pass would run outside the padding context).
        """
        if len(sizes) != x.shape[0] or any(len(s) != 2 for s in sizes):
            raise InputError(f"image_sizes must give one (height, width) per image of the batch ({x.shape[0]}), "
                             f"got {len(sizes)} entries")
        if self.training and torch.is_grad_enabled() and getattr(self.body, "grad_checkpointing", False):
            raise ConfigError("padded batches cannot use block-level gradient checkpointing (set_grad_checkpointing)"
                              ": build the detector with checkpoint=True, which recomputes the LESA terms with the"
                              " padding mask")
        valid = torch.tensor([[int(h), int(w)] for h, w in sizes], device=x.device)
        with batch_padding(valid, x.shape[-2:]):
            return self.body.forward_intermediates(x, intermediates_only=True)


def build_backbone(
    name: str,
    dcn_stages: Sequence[int] = (),
    deform_unary: bool = False,
    trainable_layers: int = 3,
    frozen_bn: bool = True,
    table_size: int = 1024,
    checkpoint: bool = False,
    impl: str = "auto",
    pos_embed: str = "rel2d",
    stem: Optional[str] = None,
    **model_kwargs: Any,
) -> LesaFPNBackbone:
    """A lesa model as an FPN backbone. ``table_size``: the input size the position tables are built for
    (any size runs); ``dcn_stages``: stages (1-4) whose 3x3 convolutions are deformable;
    ``deform_unary``: LESA's unary convolution deformable (one offset group)."""
    kwargs = dict(num_classes=0, img_size=table_size, last_stride=2, dcn_stages=tuple(dcn_stages), **model_kwargs)
    if not name.startswith("resnet") and not name.startswith("wide_resnet"):  # attention models
        kwargs.update(impl=impl, pos_embed=pos_embed, checkpoint=checkpoint)
        if deform_unary:
            if "lesa" not in name:
                raise ConfigError(f"deform_unary needs a LESA backbone, got {name!r}")
            kwargs["unary"] = "deform"
    elif deform_unary:
        raise ConfigError(f"deform_unary needs a LESA backbone, got {name!r}")
    if name.endswith("_tiny"):
        kwargs["stem"] = stem or "imagenet"  # strides 4-32, as the FPN's anchors expect
    elif stem:
        kwargs["stem"] = stem
    body = create_model(name, **kwargs)
    return LesaFPNBackbone(body, trainable_layers=trainable_layers, frozen_bn=frozen_bn)
