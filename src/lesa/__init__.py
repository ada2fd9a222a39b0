"""lesa: Locally Enhanced Self-Attention (Yang et al., 2021) for PyTorch.

Layers (:mod:`lesa.layers`), the ResNet/WRN model family (:func:`create_model`, :func:`list_models`),
official-checkpoint import (:func:`convert_official_state_dict`).
"""
from .convert import convert_official_state_dict
from .layers import AttentionAugmentedConv2d, BinaryAttention2d, LESA2d, SelfAttention2d
from .models import create_model, fuse_for_inference, list_models, resize_pos_embed
from .weights import load_weights

__version__ = "0.1.0"
__all__ = [
    "AttentionAugmentedConv2d",
    "BinaryAttention2d",
    "LESA2d",
    "SelfAttention2d",
    "__version__",
    "convert_official_state_dict",
    "create_model",
    "fuse_for_inference",
    "list_models",
    "load_weights",
    "resize_pos_embed",
]
