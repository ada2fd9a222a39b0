"""Looking inside the binary term: attention rows and the softmax diagonal without the ``(HW)^2`` matrix.

The analysis of unary and binary shares (Tables 1 and 2, :mod:`lesa.analysis`) reads ``p_ii``, the softmax
weight a query gives itself (Eq. 2-3), and single attention rows; Table 1's ablation (:func:`ablate_unary`)
drops each query's own term ``p_ii v_i`` from the sum. All of them form the BN-normalised logits a block of
queries at a time, from the fused path's operands (:meth:`~lesa.layers.binary.BinaryAttention2d.fused_operands`),
so they work at any map size. The functions take a :class:`~lesa.layers.binary.BinaryAttention2d` (``layer``)
first; they run in eval mode, where they change no BatchNorm statistics.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .checks import check_input
from .flat_attention import flat_block_logits, flat_windows, softmax_f32
from .padding import KeyMask
from .rel2d_attention import augment_rel2d


def softmax_diagonal(rows: Callable[[int, int], Tensor], num: int, block: int) -> Tensor:
    """``p_ii`` of a softmax over ``num`` keys whose logit rows ``rows(start, stop)`` come in blocks."""
    parts = []
    for start in range(0, num, block):
        logits = rows(start, min(num, start + block))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        own = logits.diagonal(offset=start, dim1=-2, dim2=-1)
        parts.append(torch.exp(own - logits.logsumexp(-1)))
    return torch.cat(parts, dim=-1)


def logit_rows(layer: nn.Module, q: Tensor, k: Tensor, height: int, width: int,
               mask: Optional[KeyMask] = None) -> Callable[[int, int], Tensor]:
    """``rows(start, stop)``: the BN-normalised logits ``(N, G, stop - start, HW)`` of those queries, equal to
    rows of the reference path's logits (padded keys: ``MASKED_LOGIT`` instead of ``-inf``). Use in eval mode
    (training would update the BN)."""
    ops = layer.fused_operands(q, k, height, width, mask)
    if layer.pos_embed != "flat":
        q_aug, k_aug = augment_rel2d(ops["q"], ops["k"], ops["rows"], ops["cols"])
        return lambda start, stop: q_aug[:, :, start:stop] @ k_aug.transpose(-1, -2)
    num = q.shape[-2]

    def rows(start: int, stop: int) -> Tensor:
        wq, wk = flat_windows(start, stop - start, num)
        return flat_block_logits(ops["q_k"][:, :, start:stop], ops["q_r"][:, :, start:stop], k, ops["k_r"],
                                 ops["tq"][:, wq], ops["tk"][:, wk], ops["shift"])[0]

    return rows


def _eval_qkv(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if layer.training:
        raise RuntimeError("attention analysis runs in eval mode (call model.eval()): in training mode it "
                           "would update the BatchNorm statistics")
    check_input(x, layer.in_channels, type(layer).__name__, layer.qkv.weight)
    layer.rel_pos.check_size(*x.shape[-2:])
    return layer.project_qkv(x)


@torch.no_grad()
def attention_diagonal(layer: nn.Module, x: Tensor) -> Tensor:
    """``p_ii``, the softmax weight each query gives itself (Eq. 2-3), ``(N, heads, H*W)``."""
    q, k, _ = _eval_qkv(layer, x)
    return softmax_diagonal(logit_rows(layer, q, k, *x.shape[-2:]), q.shape[-2], layer.query_block(q))


@torch.no_grad()
def attention_row(layer: nn.Module, x: Tensor, query: int) -> Tensor:
    """The attention weights of one query (raster index) over all keys, ``(N, heads, H*W)``."""
    q, k, _ = _eval_qkv(layer, x)
    logits = logit_rows(layer, q, k, *x.shape[-2:])(query, query + 1)
    return softmax_f32(logits)[:, :, 0]


def remove_self_term(layer: nn.Module, q: Tensor, k: Tensor, v: Tensor, values: Tensor,
                     value_embed: Optional[Tensor], height: int, width: int,
                     mask: Optional[KeyMask] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Table 1's ablation: drop each query's own term ``p_ii v_i`` (and ``p_ii r_v[0]``) from the sums."""
    if layer.training:
        raise RuntimeError("the unary ablation is an evaluation-time analysis; call model.eval()")
    if layer.folded:
        raise ConfigError("the unary ablation needs the unfused model (its v carries bn_out's shift): "
                          "run it on a model not passed through fuse_for_inference")
    own = softmax_diagonal(logit_rows(layer, q, k, height, width, mask), q.shape[-2], layer.query_block(q))
    own = own.unsqueeze(-1).to(values.dtype)
    values = values - own * v
    if value_embed is not None:
        _, _, tv = layer.rel_pos.tables()
        value_embed = value_embed - own * tv[:, q.shape[-2] - 1].to(values.dtype)
    return values, value_embed


@contextlib.contextmanager
def ablate_unary(model: nn.Module) -> Iterator[nn.Module]:
    """Table 1's unary ablation: within the block, every attention layer of ``model`` (in eval mode)
    drops each query's own term (:func:`remove_self_term`).

    Eq. 2 splits self-attention into ``S_ii v_i`` (the unary term) and ``sum_{j != i} S_ij v_j``; the
    binary term here drops ``S_ii v_i`` (and, with the 'flat' embedding, the value embedding's own term
    ``S_ii r_v[0]``) before its output BatchNorm, and nothing else changes. For an SA model this is
    "SA - unary term"; in a LESA model it removes the diagonal of the binary term (not the
    convolutional unary term).
    """
    # the binary terms are the modules with the switch (this module sits below binary.py, which calls
    # remove_self_term, so it recognises them by it rather than by class)
    layers = [m for m in model.modules() if hasattr(m, "ablate_unary")]
    if not layers:
        raise ConfigError("the model has no attention layers (SA / LESA) whose unary term could be removed")
    for layer in layers:
        layer.ablate_unary = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.ablate_unary = False
