"""Exact attention with 2-D relative logits at linear memory: ``softmax(q_i.k_j + rows_i[y_j] + cols_i[x_j]) v``.

``rows`` ``(..., HW, H)`` and ``cols`` ``(..., HW, W)`` are each query's logits against every key row and
column (``q_i.r_h[y - y_i]`` and ``q_i.r_w[x - x_i]`` for the relative embedding of Eq. 5; any per-query
bias that is separable over key rows and columns works). The sum is the dot product of ``q_i`` extended
with ``rows_i`` and ``cols_i`` and ``k_j`` extended with one-hot indicators of its row and column
(:func:`augment_rel2d`), so the whole attention runs in flash / memory-efficient kernels without the
``(HW)^2`` matrix: one :func:`~torch.nn.functional.scaled_dot_product_attention` call of head width
``d + H + W`` (:func:`sdpa`).

On the CPU the one-hot columns dominate the cost (the kernels are compute-bound and ``d`` is small), so
:class:`KeyRowSplitAttention` splits the keys into groups of a few rows: within a group only those rows'
indicators are needed (width ``d + W + rows``), and the groups' partial results merge through their
log-sum-exps, as in flash attention's own blocking. The backward pass calls the kernel's backward per
group with the merged output and log-sum-exp, which yields exactly each group's share of the
gradients. It uses PyTorch's CPU flash kernel directly; where that is missing, and under ``torch.export``,
:func:`sdpa` serves. ``torch.compile`` captures both whole.

Padded keys ride the same columns: a key in a padded row or column gets :data:`MASKED_LOGIT` as its row
(or column) logit and a zero key vector (so that no ``q.k`` offsets it, whatever the padding holds), so the
kernels need no ``(HW)^2`` mask. It is finite because the one-hot product multiplies it by the zeros of every
other key (``-inf * 0`` would be NaN), and large enough that its ``exp`` is exactly 0 beside any key inside
the image in every dtype (``exp(-745)`` underflows float64), so a masked key adds nothing, in the forward or
the backward; a group of the key-row split whose rows are all padding merges with weight 0. Every row holds
at least one key inside (each image has at least one pixel).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Key rows per group: the width d + W + 16 keeps the one-hot overhead small, and calls of 16 key rows keep
# the kernel efficient (the best of 4-32 rows for C=256, 8 heads at 32x32-96x96; 30% faster than one
# call at 64x64, benchmarks/bench_layer.py).
ROWS_PER_GROUP = 16
_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"
# A padded key's row / column logit: finite (float16 too, twice over) and exp() of it is 0 in every dtype.
MASKED_LOGIT = -1.0e4


def augment_rel2d(q: Tensor, k: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``[q_i, cols_i, rows_i] . [k_j, onehot(x_j), onehot(y_j)] = q_i.k_j + rows_i[y_j] + cols_i[x_j]``."""
    q_cols, k_cols = column_augmented(q, k, cols)
    row_onehot = torch.eye(rows.shape[-1], dtype=k.dtype, device=k.device).repeat_interleave(cols.shape[-1], 0)
    return torch.cat([q_cols, rows], dim=-1), torch.cat([k_cols, row_onehot.expand(*k.shape[:-1], -1)], dim=-1)


def column_augmented(q: Tensor, k: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``[q_i, cols_i]`` and ``[k_j, onehot(x_j)]`` (keys in raster order)."""
    num_cols = cols.shape[-1]
    col_onehot = torch.eye(num_cols, dtype=k.dtype, device=k.device).repeat(k.shape[-2] // num_cols, 1)
    return torch.cat([q, cols], dim=-1), torch.cat([k, col_onehot.expand(*k.shape[:-1], -1)], dim=-1)


def pad_to(t: Tensor, width: int) -> Tensor:
    return F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] != width else t


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unscaled attention through :func:`~torch.nn.functional.scaled_dot_product_attention`.

    Flash kernels (CPU and CUDA) need one width for q, k and v, a multiple of 8 on CUDA: all three are
    zero-padded to a common width (zeros add nothing to the dot products) and the output is cut back.
    """
    dv = v.shape[-1]
    width = -(-max(q.shape[-1], dv) // 8) * 8
    q, k, v = (pad_to(t, width) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :dv]


def rel2d_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``softmax_j(q_i.k_j + rows_i[y_j] + cols_i[x_j]) v_j`` for ``(N, G, HW, .)`` operands, without
    the ``(HW)^2`` matrix; keys in raster order (``j = y * W + x``)."""
    height = rows.shape[-1]
    if (q.device.type == "cpu" and height > ROWS_PER_GROUP and hasattr(torch.ops.aten, _CPU_FLASH)
            and not exporting()):
        return KeyRowSplitAttention.apply(q, k, v, rows, cols)
    return sdpa(*augment_rel2d(q, k, rows, cols), v)


def exporting() -> bool:
    """Under ``torch.export`` (and the ONNX exporter): graphs must not hold private kernels, so
    :func:`rel2d_attention` takes the one public ``scaled_dot_product_attention`` call (the same function)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _group_operands(q_cols: Tensor, rows: Tensor, k_cols: Tensor, v: Tensor, start: int, stop: int,
                    width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Padded ``q, k, v`` of the keys in rows ``start:stop``: only those rows' indicators are needed."""
    num_cols = k_cols.shape[-2] // rows.shape[-1]
    keys = slice(start * num_cols, stop * num_cols)
    onehot = torch.eye(stop - start, dtype=k_cols.dtype, device=k_cols.device).repeat_interleave(num_cols, 0)
    q_g = pad_to(torch.cat([q_cols, rows[..., start:stop]], dim=-1), width)
    k_g = pad_to(torch.cat([k_cols[..., keys, :], onehot.expand(*k_cols.shape[:-2], -1, -1)], dim=-1), width)
    return q_g, k_g, pad_to(v[..., keys, :], width)


class KeyRowSplitAttention(torch.autograd.Function):
    """:func:`rel2d_attention` on the CPU, keys split into groups of :data:`ROWS_PER_GROUP` rows."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        height, d, dv = rows.shape[-1], q.shape[-1], v.shape[-1]
        q_cols, k_cols = column_augmented(q, k, cols)
        width = max(q_cols.shape[-1] + ROWS_PER_GROUP, dv)
        flash = getattr(torch.ops.aten, _CPU_FLASH)
        out = lse = None
        for start in range(0, height, ROWS_PER_GROUP):
            group = _group_operands(q_cols, rows, k_cols, v, start, min(height, start + ROWS_PER_GROUP), width)
            out_g, lse_g = flash(*group, scale=1.0)
            out_g = out_g.to(lse_g.dtype)  # merge in the kernel's accumulation precision
            if out is None:
                out, lse = out_g, lse_g
                continue
            merged = torch.logaddexp(lse, lse_g)
            out = out * (lse - merged).exp().unsqueeze(-1) + out_g * (lse_g - merged).exp().unsqueeze(-1)
            lse = merged
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, rows, cols, out, lse)
        ctx.dims = (d, dv, width)
        return out[..., :dv].contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):
        q, k, v, rows, cols, out, lse = ctx.saved_tensors
        d, dv, width = ctx.dims
        height = rows.shape[-1]
        q_cols, k_cols = column_augmented(q, k, cols)
        grad_out = pad_to(grad_out.contiguous(), width)
        backward = getattr(torch.ops.aten, _CPU_FLASH + "_backward")
        grad_q_cols = torch.zeros_like(q_cols)
        grad_rows = torch.empty_like(rows)
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        keys_per_row = k.shape[-2] // height
        for start in range(0, height, ROWS_PER_GROUP):
            stop = min(height, start + ROWS_PER_GROUP)
            group = _group_operands(q_cols, rows, k_cols, v, start, stop, width)
            # With the merged output and log-sum-exp, the kernel's backward gives this group's exact share.
            gq, gk, gv = backward(grad_out, *group, out, lse, 0.0, False, scale=1.0)
            grad_q_cols += gq[..., : q_cols.shape[-1]]
            grad_rows[..., start:stop] = gq[..., q_cols.shape[-1]: q_cols.shape[-1] + stop - start]
            keys = slice(start * keys_per_row, stop * keys_per_row)
            grad_k[..., keys, :] = gk[..., :d]
            grad_v[..., keys, :] = gv[..., :dv]
        return grad_q_cols[..., :d], grad_k, grad_v, grad_rows, grad_q_cols[..., d:]

