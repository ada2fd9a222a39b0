"""The paper's analyses: unary/binary weight shares (Tables 1-2), the unary ablation (Table 1), maps and
figures, and the comparison of operations (Tables 1, 2, 6; Fig. 5)."""
from ..layers import ablate_unary
from .maps import attention_map, gate_maps
from .shares import analysis_slots, unary_binary_shares

__all__ = ["ablate_unary", "analysis_slots", "attention_map", "gate_maps", "unary_binary_shares"]
