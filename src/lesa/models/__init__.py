"""ResNet / WRN model family with LESA and the paper's baselines."""
from .fuse import fuse_for_inference
from .pos_embed import resize_pos_embed
from .registry import ARCHS, build_resnet, create_model, default_cfg, is_model, list_models, parse_name
from .resnet import OPS, Bottleneck, ResNet, attention_layers
from .timm_hook import register_with_timm

register_with_timm()

__all__ = [
    "ARCHS",
    "OPS",
    "Bottleneck",
    "ResNet",
    "attention_layers",
    "build_resnet",
    "create_model",
    "default_cfg",
    "fuse_for_inference",
    "is_model",
    "list_models",
    "parse_name",
    "resize_pos_embed",
]
