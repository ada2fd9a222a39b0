"""Inference-time folding: what eval mode fixes is computed once instead of on every call.

Eval mode alone already turns the attention-logit BatchNorm into one scale per head and term (the fused
and dense paths never form the stacked logits). :func:`fuse_for_inference` also folds every other
BatchNorm into the convolution before it (stem, bottlenecks, downsampling, ``qkv``, unary, fusion gate)
and the binary term's output BatchNorm into its values (:meth:`BinaryAttention2d.fold_batch_norms`).
"""
from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError
from ..layers import BinaryAttention2d
from ..layers.fusion import DynamicFusionGate
from ..layers.unary import UnaryConv2d

M = TypeVar("M", bound=nn.Module)
CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _refuse_training(module: nn.Module, args) -> None:
    if module.training:
        raise ConfigError("this model was fused for inference (lesa.fuse_for_inference folded its BatchNorms "
                          "away): it cannot train. Build or load the model again to train it")


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats


@torch.no_grad()
def fuse_for_inference(model: M) -> M:
    """Fold ``model``'s BatchNorms into the convolutions / attention values before them, in place, and
    return it in eval mode. The function it computes is unchanged (up to rounding); training it afterwards
    raises (the BatchNorms are gone). Works on any lesa model or layer."""
    model.eval()
    for module in list(model.modules()):
        if isinstance(module, BinaryAttention2d):
            module.fold_batch_norms()
        elif isinstance(module, UnaryConv2d):
            module.fold_batch_norm()
        elif isinstance(module, DynamicFusionGate):
            module.fold_batch_norms()
        elif isinstance(module, nn.Sequential):  # downsampling: conv, BN
            children = list(module.named_children())
            for (name, conv), (bn_name, bn) in zip(children, children[1:]):
                if _foldable(conv, bn):
                    setattr(module, name, fuse_conv_bn_eval(conv, bn))
                    setattr(module, bn_name, nn.Identity())
        else:  # stem and bottlenecks
            for conv_name, bn_name in CONV_BN_PAIRS:
                conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
                if conv is not None and bn is not None and _foldable(conv, bn):
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(module, bn_name, nn.Identity())
    if not getattr(model, "fused_for_inference", False):
        model.register_forward_pre_hook(_refuse_training)
        model.fused_for_inference = True
    return model
