"""Exact attention with 2-D relative logits at linear memory: ``softmax(q_i.k_j + rows_i[y_j] + cols_i[x_j]) v``,
and the block sizes of every fused kernel (:func:`block_sizes`).

This is the binary term of Eq. 5 of "Locally Enhanced Self-Attention: Combining Self-Attention and
Convolution as Local and Context Terms" (arXiv 2107.05637) with the 2-D relative embedding. ``rows``
``(..., HW, H)`` and ``cols`` ``(..., HW, W)`` are each query's logits against every key row and column
(``q_i.r_h[y - y_i]`` and ``q_i.r_w[x - x_i]``; any per-query bias that is separable over key rows and
columns works). The sum is the dot product of ``q_i`` extended with ``rows_i`` and ``cols_i`` and ``k_j``
extended with one-hot indicators of its row and column (:func:`augment_rel2d`), so the whole attention runs
in flash / memory-efficient kernels without the ``(HW)^2`` matrix: one
:func:`~torch.nn.functional.scaled_dot_product_attention` call of head width ``d + H + W`` (:func:`sdpa`).

:class:`KeyRowSplitAttention` splits the keys into groups of whole rows (or tiles of rows x columns): a
group needs only its own rows' and columns' indicators (width ``d + columns + rows``), and the groups'
partial results merge through their log-sum-exps, as in flash attention's own blocking. The backward pass
calls the kernel's backward per group with the merged output and log-sum-exp, which yields exactly each
group's share of the gradients. Where it runs is :func:`block_sizes`'s decision: on the CPU in groups of 16
rows wherever a map has more (the kernels are compute-bound there and the one-hot columns would dominate),
on CUDA where ``d + H + W`` exceeds the 256 flash attention takes (groups as wide as it takes). It calls
the device's attention kernel that returns log-sum-exps directly (:func:`lse_kernel`); where there is none,
and under ``torch.export``, :func:`sdpa` serves. ``torch.compile`` captures both whole.

Padded keys ride the same columns: a key in a padded row or column gets :data:`MASKED_LOGIT` as its row
(or column) logit and a zero key vector (so that no ``q.k`` offsets it, whatever the padding holds), so the
kernels need no ``(HW)^2`` mask. It is finite because the one-hot product multiplies it by the zeros of every
other key (``-inf * 0`` would be NaN), and large enough that its ``exp`` is exactly 0 beside any key inside
the image in every dtype (``exp(-745)`` underflows float64), so a masked key adds nothing, in the forward or
the backward; a group of the key split whose keys are all padding merges with weight 0. Every row holds
at least one key inside (each image has at least one pixel).

This module is the one every fused kernel imports, so the block policy of all of them lives here.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import ConfigError

BLOCK_POLICIES = ("cpu", "cuda")
POLICY_VARIABLE = "LESA_BLOCK_POLICY"
# The CPU policy, sized for a CPU's caches (benchmarks/bench_layer.py, 2 threads; docs/performance.md):
QUERY_BLOCK_ELEMS = 1 << 21  # 'flat' query blocks: logits per block, N * G * B * P
# 'flat' dense kernel: elements per (N * G, B, P + B - 1) temporary: in cache, and small enough for the
# allocator to reuse instead of mapping fresh pages on every call
DENSE_BLOCK_ELEMS = 1 << 19
# 'rel2d' key rows per group: the width d + W + 16 keeps the one-hot overhead small, and calls of 16 key rows
# keep the kernel efficient (the best of 4-32 rows for C=256, 8 heads at 32x32-96x96; 30% faster than one
# call at 64x64)
ROWS_PER_GROUP = 16
# The CUDA policy, sized by memory: a 'flat' kernel's block takes at most this share of the free memory (the
# rest stays for the activations the step still makes and keeps, and the allocator's slack) ...
FREE_MEMORY_SHARE = 1 / 4
# ... at its peak in forward + backward, counted in float32 tensors of the block's logits (N, G, B, P): measured
# (peak resident set on the CPU, N * G = 32, P = 1024) 8.1-8.3 for FlatBlockedAttention (B = 256, 1024) and
# 4.3 for FlatDenseAttention in one block of all rows (docs/performance.md, "Launch budget")
BLOCKED_TEMPORARIES = 9
DENSE_TEMPORARIES = 5
# the free memory assumed on a device that cannot report it (the CUDA policy forced on the CPU: tests and
# counts): an H200 (141 GB, this project's GPU) holding a ResNet-50 training step, so the budget is 32 GiB
NOMINAL_FREE_MEMORY = 128 << 30
# the widest head flash attention takes (PyTorch's check_head_dim_size_flash, sdp_utils.cpp)
FLASH_MAX_WIDTH = 256
_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"
# A padded key's row / column logit: finite (float16 too, twice over) and exp() of it is 0 in every dtype.
MASKED_LOGIT = -1.0e4


class Blocks(NamedTuple):
    """Block sizes of the fused kernels for one attention problem (:func:`block_sizes`)."""

    queries: int  # 'flat' (FlatBlockedAttention): queries per block; all P: one block (FlatDenseAttention)
    dense_rows: int  # 'flat' (FlatDenseAttention): rows per block of its relative terms
    key_rows: int  # 'rel2d' (KeyRowSplitAttention): key rows per group
    key_cols: int  # 'rel2d': key columns per group; all rows and columns: one SDPA call


def block_policy(device: torch.device) -> str:
    """``'cpu'`` or ``'cuda'``: the environment variable ``LESA_BLOCK_POLICY`` where set (read at each call, so
    tests can set it; an empty value counts as unset), else ``'cuda'`` for a CUDA tensor, ``'cpu'`` for any other.

    Raises:
        ConfigError: another value of the variable, naming the valid ones.
    """
    forced = os.environ.get(POLICY_VARIABLE)
    if not forced:
        return "cuda" if device.type == "cuda" else "cpu"
    if forced not in BLOCK_POLICIES:
        raise ConfigError(f"{POLICY_VARIABLE}={forced!r} is not a block policy: use cpu or cuda, or unset it "
                          "(the tensor's device decides)")
    return forced


@torch.compiler.assume_constant_result
def free_device_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device (``torch.cuda.mem_get_info``), :data:`NOMINAL_FREE_MEMORY` on any other;
    under ``torch.compile`` the value when the graph was traced (a constant of the graph)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return NOMINAL_FREE_MEMORY


def block_sizes(device: torch.device, dtype: torch.dtype, matrices: int, height: int, width: int = 1,
                head_width: int = 0, query_elems: Optional[int] = None) -> Blocks:
    """Every block size of the fused kernels, by the policy of ``device`` (:func:`block_policy`).

    The problem: ``matrices`` attention matrices (batch x heads) over the ``P = height * width`` positions of
    a map (a 'flat' sequence of ``P`` positions is ``P x 1``), queries of width ``head_width`` (``d``; 'rel2d'
    extends them by ``H + W``), operands of ``dtype``.

    * policy ``'cpu'`` (a CPU's caches): 'flat' queries per block ``Q / (matrices * P)`` with ``Q`` =
      :data:`QUERY_BLOCK_ELEMS` logits (or ``query_elems``, a layer's ``block_elems``), dense-kernel rows per
      block ``D / (2 * matrices * P)`` with ``D`` = :data:`DENSE_BLOCK_ELEMS` (its temporaries are
      ``B x (P + B - 1)``); 'rel2d' key groups of :data:`ROWS_PER_GROUP` whole rows.
    * policy ``'cuda'`` (a block as large as memory allows, so that the number of kernels a layer launches
      does not grow with the batch): with ``E`` the elements (at least float32: the softmaxes' precision)
      that :data:`FREE_MEMORY_SHARE` of :func:`free_device_memory` holds, queries per block
      ``E / (BLOCKED_TEMPORARIES * matrices * P)`` (or ``query_elems / (matrices * P)``), dense rows
      ``E / (DENSE_TEMPORARIES * matrices * P)``: the kernels' measured peaks. At the paper's
      classification size (14x14, 8 heads) every batch up to 3,100 is one block at the nominal 128 GiB free
      (an 80 GB GPU with 64 GiB free: 1,550). 'rel2d' splits the keys only where one call is wider than
      :data:`FLASH_MAX_WIDTH` (``d + H + W > 256``, from about 120x120 maps), into as few groups as keep
      each call within it (:func:`flash_key_groups`).

    Every size is at least 1 and at most the map's extent.

    Raises:
        ConfigError: an invalid ``LESA_BLOCK_POLICY``.
    """
    num = height * width
    per_row = max(1, matrices * num)  # elements of one query row over all matrices
    if block_policy(device) == "cpu":
        queries = (query_elems or QUERY_BLOCK_ELEMS) // per_row
        dense_rows = DENSE_BLOCK_ELEMS // (2 * per_row)
        key_rows, key_cols = min(height, ROWS_PER_GROUP), width
    else:
        itemsize = torch.promote_types(dtype, torch.float32).itemsize
        elems = int(free_device_memory(device) * FREE_MEMORY_SHARE) // itemsize
        queries = query_elems // per_row if query_elems else elems // (BLOCKED_TEMPORARIES * per_row)
        dense_rows = elems // (DENSE_TEMPORARIES * per_row)
        key_rows, key_cols = flash_key_groups(height, width, head_width)
    return Blocks(max(1, min(num, queries)), max(1, min(num, dense_rows)), key_rows, key_cols)


def flash_key_groups(height: int, width: int, head_width: int) -> tuple[int, int]:
    """Key rows and columns per group for calls of width ``head_width + rows + columns`` at most
    :data:`FLASH_MAX_WIDTH`: the whole map where it fits; else whole rows, in as few equal groups as fit;
    else tiles, whose columns take the room the rows leave (the rows at most half of it)."""
    room = max(2, FLASH_MAX_WIDTH - head_width)  # one row and one column at the least
    if height + width <= room:
        return height, width
    cols = width if width < room else _even_split(width, room - min(height, room // 2))
    return _even_split(height, room - cols), cols


def _even_split(extent: int, most: int) -> int:
    """The size of the fewest equal parts of ``extent`` of at most ``most`` each."""
    return math.ceil(extent / math.ceil(extent / max(1, most)))


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
    the ``(HW)^2`` matrix; keys in raster order (``j = y * W + x``). Split into key groups where
    :func:`block_sizes` says so and the device has a kernel for it (:func:`lse_kernel`), else one call."""
    height, width = rows.shape[-1], cols.shape[-1]
    blocks = block_sizes(q.device, q.dtype, q.shape[0] * q.shape[1], height, width, q.shape[-1])
    group_width = max(q.shape[-1] + blocks.key_rows + blocks.key_cols, v.shape[-1])
    if (blocks.key_rows, blocks.key_cols) != (height, width) and lse_kernel(q, group_width) is not None \
            and not exporting():
        return KeyRowSplitAttention.apply(q, k, v, rows, cols, blocks.key_rows, blocks.key_cols)
    return sdpa(*augment_rel2d(q, k, rows, cols), v)


def exporting() -> bool:
    """Under ``torch.export`` (and the ONNX exporter): graphs must not hold private kernels, so
    :func:`rel2d_attention` takes the one public ``scaled_dot_product_attention`` call (the same function)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


class LseKernel(NamedTuple):
    """An attention kernel (unscaled, no mask) that also returns each query's log-sum-exp, and its backward
    given the output and log-sum-exp to differentiate through (which may be merged over groups)."""

    forward: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # q, k, v -> out, lse
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]  # grad_out, q, k, v, out, lse -> grads of q, k, v
    align: int  # operand widths must be multiples of this


def _cpu_flash(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return getattr(torch.ops.aten, _CPU_FLASH)(q, k, v, scale=1.0)


def _cpu_flash_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    return getattr(torch.ops.aten, _CPU_FLASH + "_backward")(grad, q, k, v, out, lse, 0.0, False, scale=1.0)


def _cuda_flash(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=1.0)[:2]
    return out, lse


def _cuda_flash_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    rng = torch.empty(2, dtype=torch.uint64, device=q.device)  # the dropout's random state: read only with dropout
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, None, None, q.shape[-2], k.shape[-2], 0.0, False, rng, rng[0], scale=1.0)


def _cuda_efficient(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=1.0)[:2]
    return out, lse[..., :q.shape[-2]]  # the kernel pads it to a multiple of 32 queries


def _cuda_efficient_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    lse = F.pad(lse, (0, -lse.shape[-1] % 32))  # the padded length the backward kernel reads
    seed = torch.zeros((), dtype=torch.int64)  # the dropout's random state: read only with dropout
    return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], False, scale=1.0)[:3]


CPU_FLASH = LseKernel(_cpu_flash, _cpu_flash_backward, 1)
CUDA_FLASH = LseKernel(_cuda_flash, _cuda_flash_backward, 8)  # PyTorch's flash API needs widths % 8
CUDA_EFFICIENT = LseKernel(_cuda_efficient, _cuda_efficient_backward, 8)  # (4 would do for float32)


@torch.compiler.assume_constant_result
def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def flash_takes(device: torch.device, width: int) -> bool:
    """Whether PyTorch's CUDA flash kernels train at head width ``width`` on ``device`` (sdp_utils.cpp:
    sm80 and newer, widths up to 256, but not (192, 224] on sm86 / sm89 / sm120, short of shared memory)."""
    capability = _cuda_capability(device)
    if capability < (8, 0) or width > FLASH_MAX_WIDTH:
        return False
    return not (capability in ((8, 6), (8, 9), (12, 0), (12, 1)) and 192 < width <= 224)


def lse_kernel(q: Tensor, width: int) -> Optional[LseKernel]:
    """The kernel :class:`KeyRowSplitAttention` calls for operands like ``q`` of head width ``width``, in
    ``scaled_dot_product_attention``'s own order (cuDNN aside; docs/performance.md's table): the CPU flash
    kernel; on CUDA flash for float16 / bfloat16 where :func:`flash_takes` the width, else the
    memory-efficient kernel (float32 too, any width); ``None`` where neither applies (float64 on CUDA, other
    devices, a CPU build without it)."""
    if q.device.type == "cpu":
        return CPU_FLASH if hasattr(torch.ops.aten, _CPU_FLASH) else None
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    return CUDA_FLASH if q.dtype != torch.float32 and flash_takes(q.device, width) else CUDA_EFFICIENT


def key_groups(height: int, width: int, key_rows: int, key_cols: int) -> list[tuple[slice, slice]]:
    """The ``(rows, columns)`` of each group of keys: tiles of ``key_rows x key_cols`` covering the map."""
    return [(slice(r, min(height, r + key_rows)), slice(c, min(width, c + key_cols)))
            for c in range(0, width, key_cols) for r in range(0, height, key_rows)]


def key_tile(t: Tensor, group: tuple[slice, slice], width: int) -> Tensor:
    """The keys of ``group`` in ``t`` ``(..., H*W, c)`` (raster order on a map ``width`` wide): a
    ``(..., rows, columns, c)`` view."""
    return t.unflatten(-2, (-1, width))[..., group[0], group[1], :]


def _tile_onehot(num_rows: int, num_cols: int, like: Tensor) -> Tensor:
    """``[onehot(x_j), onehot(y_j)]`` ``(rows * columns, columns + rows)`` of a tile's keys in raster order."""
    eye_cols, eye_rows = (torch.eye(n, dtype=like.dtype, device=like.device) for n in (num_cols, num_rows))
    return torch.cat([eye_cols.repeat(num_rows, 1), eye_rows.repeat_interleave(num_cols, 0)], dim=-1)


def _group_operands(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, cols: Tensor, group: tuple[slice, slice],
                    width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Padded ``q, k, v`` of the keys in ``group``: only its rows' and columns' indicators are needed,
    ``[q_i, cols_i[group], rows_i[group]] . [k_j, onehot(x_j), onehot(y_j)]`` within the group."""
    row_span, col_span = group
    onehot = _tile_onehot(row_span.stop - row_span.start, col_span.stop - col_span.start, k)
    k_g, v_g = (key_tile(t, group, cols.shape[-1]).flatten(-3, -2) for t in (k, v))  # whole rows: no copy
    q_g = pad_to(torch.cat([q, cols[..., col_span], rows[..., row_span]], dim=-1), width)
    k_g = pad_to(torch.cat([k_g, onehot.expand(*k.shape[:-2], -1, -1)], dim=-1), width)
    return q_g, k_g, pad_to(v_g, width)


class KeyRowSplitAttention(torch.autograd.Function):
    """:func:`rel2d_attention` with the keys in groups of ``key_rows`` rows x ``key_cols`` columns (default:
    :data:`ROWS_PER_GROUP` whole rows), each group one call of :func:`lse_kernel`'s kernel."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, cols: Tensor, key_rows: int = ROWS_PER_GROUP,
                key_cols: Optional[int] = None) -> Tensor:
        height, map_width, dv = rows.shape[-1], cols.shape[-1], v.shape[-1]
        key_rows, key_cols = min(key_rows, height), min(key_cols or map_width, map_width)
        width = max(q.shape[-1] + key_rows + key_cols, dv)
        kernel = lse_kernel(q, width)
        width = -(-width // kernel.align) * kernel.align
        out = lse = None
        for group in key_groups(height, map_width, key_rows, key_cols):
            out_g, lse_g = kernel.forward(*_group_operands(q, k, v, rows, cols, group, width))
            out_g = out_g.to(lse_g.dtype)  # merge in the kernel's accumulation precision
            if out is None:
                out, lse = out_g, lse_g
                continue
            merged = torch.logaddexp(lse, lse_g)
            out = out * (lse - merged).exp().unsqueeze(-1) + out_g * (lse_g - merged).exp().unsqueeze(-1)
            lse = merged
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, rows, cols, out, lse)
        ctx.split = (key_rows, key_cols, width)
        return out[..., :dv].contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):
        q, k, v, rows, cols, out, lse = ctx.saved_tensors
        key_rows, key_cols, width = ctx.split
        d, dv, map_width = q.shape[-1], v.shape[-1], cols.shape[-1]
        kernel = lse_kernel(q, width)
        grad_out = pad_to(grad_out.contiguous(), width)
        grad_q, grad_rows, grad_cols = torch.zeros_like(q), torch.zeros_like(rows), torch.zeros_like(cols)
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        for group in key_groups(rows.shape[-1], map_width, key_rows, key_cols):
            num_cols = group[1].stop - group[1].start
            # With the merged output and log-sum-exp, the kernel's backward gives this group's exact share.
            gq, gk, gv = kernel.backward(grad_out, *_group_operands(q, k, v, rows, cols, group, width), out, lse)
            grad_q += gq[..., :d]
            grad_cols[..., group[1]] += gq[..., d:d + num_cols]
            grad_rows[..., group[0]] += gq[..., d + num_cols:d + num_cols + group[0].stop - group[0].start]
            key_tile(grad_k, group, map_width).copy_(gk[..., :d].unflatten(-2, (-1, num_cols)))
            key_tile(grad_v, group, map_width).copy_(gv[..., :dv].unflatten(-2, (-1, num_cols)))
        return grad_q, grad_k, grad_v, grad_rows, grad_cols, None, None
