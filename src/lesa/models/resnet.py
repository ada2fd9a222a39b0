"""ResNet / Wide-ResNet with LESA (or a baseline operation) in the 3x3 slot of stages 3-4.

Follows the paper (Sec. 4.1) and the authors' code: the 3x3 convolution of every bottleneck in stages 3
and 4 is replaced, except the first block of stage 3, which keeps its stride-2 convolution; stage 4 then
runs at stride 1 (a 224 input gives 14x14 maps in both stages). The conv models are exactly
torchvision's ``resnet50`` / ``wide_resnet50_2`` (same modules and parameter names: its weights load).

Replaced slots keep the block's ``bn2`` except LESA's, whose official block has none.

Operations: ``'conv'``, ``'sa'`` (:class:`SelfAttention2d`), ``'aa'`` (:class:`AttentionAugmentedConv2d`),
``'static_lesa'`` and ``'lesa'`` (:class:`LESA2d`).

The root module's ``forward`` keeps evaluated annotations (no ``from __future__ import annotations``): torch.fx
writes them into the code of its graphs, which TorchScript then compiles.
"""
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import AttentionAugmentedConv2d, DeformConv2dPack, LESA2d, SelfAttention2d
from ..layers.binary import POS_EMBEDS
from ..layers.checkpointing import checkpointed
from ..layers.checks import (
    check_bool,
    check_choice,
    check_float,
    check_input,
    check_int,
    check_ints,
    check_size2d,
    graph_mode,
)
from ..layers.factory import takes_factory_kwargs
from ..layers.lesa import UNARIES

OPS = ("conv", "sa", "aa", "static_lesa", "lesa")
ATTENTION_LAYERS = (LESA2d, SelfAttention2d, AttentionAugmentedConv2d)
GLOBAL_POOLS = ("avg", "max", "")
OUTPUT_FORMATS = ("NCHW", "NHWC")
NUM_CLASSES_HINT = "0: no classifier head"


def global_pool_layer(global_pool: str) -> nn.Module:
    """The head's pooling: ``'avg'``, ``'max'`` or ``''`` (none: the head gets the ``(N, C, H, W)`` map).
    Raises :class:`ConfigError` for another value."""
    check_choice("global_pool", global_pool, GLOBAL_POOLS)
    if global_pool == "":
        return nn.Identity()
    return nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.AdaptiveMaxPool2d(1)


def feature_indices(num_features: int, indices: Union[None, int, Sequence[int]]) -> tuple[list[int], int]:
    """timm's feature selection: ``None`` -> all, ``n`` -> the last ``n``, a sequence -> those indices (negative
    ones count from the end). Returns the absolute indices and the largest."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ConfigError(f"indices={indices} (the last n feature levels) must be in 1..{num_features}; pass "
                              f"a list of levels (0..{num_features - 1}) to choose them")
        return list(range(num_features - indices, num_features)), num_features - 1
    take = []
    for i in indices:
        index = num_features + i if i < 0 else i
        if not 0 <= index < num_features:
            raise ConfigError(f"feature index {i} is out of range: the model has {num_features} feature levels "
                              f"(0..{num_features - 1}, or -{num_features}..-1 from the end)")
        take.append(index)
    if not take:
        raise ConfigError("indices is empty: pass None (all feature levels), n (the last n) or a list of levels")
    return take, max(take)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, deform: bool = False) -> nn.Module:
    if deform:
        return DeformConv2dPack(in_planes, out_planes, 3, stride=stride, padding=1)
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def spatial_op(
    op: str, width: int, stride: int, feature_size: tuple[int, int], layer_kwargs: dict[str, Any]
) -> nn.Module:
    """The module in a bottleneck's 3x3 slot (``feature_size``: its input map size)."""
    kw = dict(layer_kwargs)
    if op == "lesa" or op == "static_lesa":
        return LESA2d(width, width, stride=stride, feature_size=feature_size,
                      fusion="dynamic" if op == "lesa" else "static", **kw)
    # Options every attention model accepts (one interface for all) that these layers do not use: still
    # checked, so that a typo in a value is not silently dropped.
    check_choice("unary", kw.pop("unary", "conv"), UNARIES)
    if op == "sa":
        return SelfAttention2d(width, width, stride=stride, feature_size=feature_size, **kw)
    if op == "aa":  # always the 2-D embedding ('rel2d'), no checkpointing
        check_choice("pos_embed", kw.pop("pos_embed", "rel2d"), POS_EMBEDS)
        check_bool("checkpoint", kw.pop("checkpoint", False))
        return AttentionAugmentedConv2d(width, width, stride=stride, feature_size=feature_size, **kw)
    raise ConfigError(f"unknown operation {op!r}; choose one of {OPS}")


class Bottleneck(nn.Module):
    """torchvision's ResNet-v1.5 bottleneck; ``op`` chooses what fills the 3x3 slot."""

    expansion = 4

    @takes_factory_kwargs
    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        base_width: int = 64,
        op: str = "conv",
        feature_size: tuple[int, int] = (14, 14),
        deform: bool = False,
        layer_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.op = op
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        if op == "conv":
            self.conv2 = conv3x3(width, width, stride, deform=deform)
        else:
            self.conv2 = spatial_op(op, width, stride, feature_size, layer_kwargs or {})
        # The official LESA block has no bn2 (LESA ends in BatchNorms of its own). The SA and static-LESA
        # baselines keep the block's bn2, as a conv slot does: with it their parameter counts are the
        # paper's (Tables 2 and 6: 18.06M and 20.43M); without it they would be 18.05M and 20.42M.
        self.bn2 = nn.Identity() if op == "lesa" else nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place: bn3's output is not needed by its backward
        return self.relu(out)


class ResNet(nn.Module):
    """Bottleneck ResNet with per-stage operations and a timm-style interface.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)``.
        stage_ops: operation of each stage's 3x3 slots (first block of a stage keeps ``'conv'`` when
            ``first_block_conv[i]``).
        strides: stride of each stage (the stem's reduction comes on top).
        widths: ``planes`` of each stage (the output is ``4 * planes``).
        width_per_group: 64 for ResNet, 128 for WRN-50-2.
        stem: ``'imagenet'`` (7x7/2 conv + max-pool, /4) or ``'small'`` (3x3 conv, /1; for 32x32 inputs).
        img_size: input size; sets the feature size the position tables are built for.
        dcn_stages: stages (1-based) whose 3x3 convolutions are deformable.
        layer_kwargs: passed to every attention layer (``heads``, ``pos_embed``, ``impl``, ``unary``,
            ``checkpoint``, ...).
        global_pool: the head's pooling, ``'avg'``, ``'max'`` or ``''`` (none).

    Raises:
        ConfigError: a model argument of the wrong type, out of range or not among its choices (one line naming
            it); the attention layers check their own (``layer_kwargs``).
        InputError: (forward) an input that is not ``(N, in_chans, H, W)`` of the parameters' dtype and device.
    """

    @takes_factory_kwargs
    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        stage_ops: Sequence[str] = ("conv",) * 4,
        strides: Sequence[int] = (1, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        first_block_conv: Sequence[bool] = (True, True, True, False),
        width_per_group: int = 64,
        stem: str = "imagenet",
        stem_width: int = 64,
        num_classes: int = 1000,
        img_size: Union[int, tuple[int, int]] = 224,
        in_chans: int = 3,
        dcn_stages: Sequence[int] = (),
        drop_rate: float = 0.0,
        zero_init_residual: bool = False,
        layer_kwargs: Optional[dict[str, Any]] = None,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        check_choice("stem", stem, ("imagenet", "small"))
        for op in stage_ops:
            check_choice("operation", op, OPS)
        self.img_size = check_size2d("img_size", img_size, hint="the input size the position tables are built for")
        self.in_chans = check_int("in_chans", in_chans, hint="input channels: 3 for RGB images")
        check_int("num_classes", num_classes, minimum=0, hint=NUM_CLASSES_HINT)
        check_float("drop_rate", drop_rate, 0.0, 1.0, hint="dropout before the classifier")
        dcn_stages = check_ints("dcn_stages", dcn_stages, 1, len(layers), hint="the stages with deformable convs")
        check_bool("zero_init_residual", zero_init_residual)
        self.stage_ops, self.num_classes, self.drop_rate = tuple(stage_ops), num_classes, drop_rate
        self.base_width = width_per_group
        self.layer_kwargs = dict(layer_kwargs or {})
        # Children in torchvision's order (conv1, bn1, relu, maxpool, layer1-4): feature extractors that run
        # the children in sequence (IntermediateLayerGetter) then work on these models too.
        imagenet_stem = stem == "imagenet"
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7 if imagenet_stem else 3, stride=2 if imagenet_stem else 1,
                               padding=3 if imagenet_stem else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1) if imagenet_stem else nn.Identity()
        reduction = 4 if imagenet_stem else 1

        self.inplanes = stem_width
        size = tuple(-(-s // reduction) for s in self.img_size)
        self.feature_info = []  # timm's: one dict (num_chs, reduction, module) per stage
        for i, (blocks, planes, stride) in enumerate(zip(layers, widths, strides)):
            stage, size = self._make_layer(
                planes, blocks, stride, stage_ops[i], first_block_conv[i], size, deform=(i + 1) in dcn_stages
            )
            self.add_module(f"layer{i + 1}", stage)
            reduction *= stride
            self.feature_info.append(dict(num_chs=self.inplanes, reduction=reduction, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = self.inplanes
        self.global_pool = global_pool
        self.avgpool = global_pool_layer(global_pool)
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights(zero_init_residual)

    def _make_layer(
        self, planes: int, blocks: int, stride: int, op: str, first_conv: bool, size: tuple[int, int],
        deform: bool,
    ) -> tuple[nn.Sequential, tuple[int, int]]:
        out_planes = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes))
        blocks_list = []
        for b in range(blocks):
            block_op = "conv" if (b == 0 and first_conv) else op
            block_stride = stride if b == 0 else 1
            blocks_list.append(Bottleneck(
                self.inplanes, planes, block_stride, downsample if b == 0 else None, self.base_width,
                block_op, size, deform=deform and block_op == "conv", layer_kwargs=self.layer_kwargs,
            ))
            self.inplanes = out_planes
            size = tuple(-(-s // block_stride) for s in size)
        return nn.Sequential(*blocks_list), size

    def init_weights(self, zero_init_residual: bool = False) -> None:
        """torchvision's ResNet init; attention layers then apply their own (the official order)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, ATTENTION_LAYERS):
                m.reset_parameters()
            elif isinstance(m, DeformConv2dPack):
                m.reset_offset()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    # -- timm's interface (as timm's ResNet; feature levels: the outputs of the four stages) ------------
    def stem(self, x: Tensor) -> Tensor:
        check_input(x, self.in_chans, "ResNet", self.conv1.weight, "in_chans")
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass of training (BatchNorm statistics are not counted twice;
        eager mode and torch.compile, not torch.fx / TorchScript graphs)."""
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for timm's layer-wise learning-rate decay: the stem, then stages or blocks."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def _checkpointing(self, x: Tensor) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled() and graph_mode(x) != "symbolic"

    def run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        """One stage, block by block under gradient checkpointing (eager mode)."""
        if not self._checkpointing(x):
            return stage(x)
        for block in stage:
            x = checkpointed(block, block, x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if not torch.jit.is_scripting():
            if self._checkpointing(x):
                for stage in self.stages():
                    x = self.run_stage(stage, x)
                return x
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Union[None, int, Sequence[int]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """timm's ``forward_intermediates``: the final features and the outputs of the chosen stages.

        ``indices``: ``None`` (all four stages), ``n`` (the last ``n``) or a list (negative from the end);
        ``norm``: no effect (a ResNet has no final norm); ``stop_early``: run no stage after the last chosen
        one (the "final features" are then that stage's output); ``output_fmt``: ``'NCHW'`` or ``'NHWC'``
        for the intermediates; ``intermediates_only``: return only the list.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ConfigError(f"output_fmt={output_fmt!r} is not supported; choose 'NCHW' or 'NHWC'")
        take, max_index = feature_indices(len(self.feature_info), indices)
        stages = self.stages()
        if stop_early:
            stages = stages[: max_index + 1]
        x = self.stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = self.run_stage(stage, x)
            if i in take:
                intermediates.append(x.permute(0, 2, 3, 1) if output_fmt == "NHWC" else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head with ``prune_head``); returns the
        absolute indices, as timm's ``features_only`` wrapper expects."""
        take, max_index = feature_indices(len(self.feature_info), indices)
        for i in range(max_index + 1, len(self.feature_info)):
            setattr(self, f"layer{i + 1}", nn.Sequential())  # empty: passes its input through
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.avgpool(x)
        if self.global_pool != "":
            x = torch.flatten(x, 1)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new (untrained) classifier for ``num_classes`` (0: none, the model outputs pooled features);
        ``global_pool``: ``'avg'``, ``'max'`` or ``''`` (no pooling), ``None`` keeps the current one."""
        check_int("num_classes", num_classes, minimum=0, hint=NUM_CLASSES_HINT)
        if global_pool is not None:
            self.avgpool = global_pool_layer(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every LESA / SA / AA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ATTENTION_LAYERS)]


ModelFn = Callable[..., ResNet]
