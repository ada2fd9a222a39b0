"""LESA layers: one paper concept a module."""
from .attention_augmented import AttentionAugmentedConv2d
from .binary import BinaryAttention2d
from .deform import DeformConv2dPack
from .fusion import DynamicFusionGate
from .inspection import ablate_unary
from .lesa import LESA2d
from .rel_pos import FlatRelPosEmbed, RelPosEmbed2d, resize_rel_table
from .self_attention import SelfAttention2d
from .unary import UnaryConv2d

__all__ = [
    "AttentionAugmentedConv2d",
    "BinaryAttention2d",
    "DeformConv2dPack",
    "DynamicFusionGate",
    "FlatRelPosEmbed",
    "LESA2d",
    "RelPosEmbed2d",
    "SelfAttention2d",
    "UnaryConv2d",
    "ablate_unary",
    "resize_rel_table",
]
