"""The fused kernels of the 'flat' binary term: attention with the flat relative embedding, exact, without
the reference path's stacked ``(N, 3G, P, P)`` logits, their BatchNorm or Toeplitz-expanded tables.

The paper's classification layers (Eq. 5 of "Locally Enhanced Self-Attention: Combining Self-Attention and
Convolution as Local and Context Terms", arXiv 2107.05637, with the official code's flat embedding) add to
``q_i.k_j`` the relative logits ``q_i.r_q[i - j]`` and ``k_j.r_k[j - i]`` of raster-flattened offsets, and to
the values the value embedding ``sum_j p_ij r_v[i - j]``. Offsets of a flattened map have no low-rank form,
so each relative term is a product of a block of queries (or keys) with the *window* of its ``(d, 2P - 1)``
offset table that the block uses, read through a skewed view (:func:`skew`). The logit BatchNorm arrives
as per-head scales already applied to ``q`` and ``k`` (:meth:`~lesa.layers.binary.BinaryAttention2d.fused_operands`).

* :class:`FlatDenseAttention`: all ``(N, G, P, P)`` logits at once, the probabilities kept for a
  hand-written backward; its relative terms in row blocks (:func:`dense_blocks`).
* :class:`FlatBlockedAttention`: blocks of queries, each recomputed in backward, ``O(block * P)`` memory;
  :func:`flat_blocked_attention` is the same under graph capture.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .rel2d_attention import block_sizes

CPU = torch.device("cpu")


def softmax_f32(logits: Tensor) -> Tensor:
    """Softmax over the last dim computed in at least float32: under autocast the logits may be bfloat16 /
    float16, whose 8 / 11-bit mantissas lose the small weights of a long row (CPU autocast keeps softmax in
    the input's dtype; CUDA autocast promotes it)."""
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))



def flat_windows(start: int, block: int, num: int) -> tuple[slice, slice]:
    """Table columns used by queries ``start : start+block``: for ``r_q``/``r_v`` and for ``r_k``."""
    span = block + num - 1
    return slice(start, start + span), slice(num - start - block, 2 * num - start - 1)


def flat_block_logits(
    q_k: Tensor, q_r: Tensor, k: Tensor, k_r: Tensor, win_q: Tensor, win_k: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """BN-normalised flat-embedding logits ``(N, G, B, P)`` of a block of ``B`` consecutive queries.

    ``q_k``/``q_r``: the block's queries scaled for the ``q.k`` and ``q.r_q`` terms; ``k``/``k_r``: all ``P``
    keys, unscaled and scaled for the ``k.r_k`` term; ``win_*``: the ``B + P - 1`` table columns the block
    uses (:func:`flat_windows`); ``shift``: the BN's per-head constant. Also returns the skew index
    (``[t, j]`` -> window column of offset ``i - j``).
    """
    blk, num = q_k.shape[-2], k.shape[-2]
    logits = torch.baddbmm(shift.expand(*q_k.shape[:2], 1, 1).flatten(0, 1), q_k.flatten(0, 1),
                           k.flatten(0, 1).transpose(-1, -2)).view(*q_k.shape[:3], num)
    # q_i . r_q[i - j] for query i = start + t sits in window column t + P - 1 - j.
    skew = (torch.arange(blk, device=k.device).unsqueeze(1) + (num - 1)
            - torch.arange(num, device=k.device).unsqueeze(0)).expand(*logits.shape)
    logits = logits + (q_r @ win_q).gather(-1, skew)
    # k_j . r_k[j - i] sits in window column j + B - 1 - t.
    windows = win_k.unfold(1, blk, 1)  # (d, P, B): [c, j, s] = window column j + s
    logits = logits + torch.einsum("ngjd,djs->ngsj", k_r, windows).flip(-2)
    return logits, skew


def flat_attention_block(
    q_k: Tensor, q_r: Tensor, k: Tensor, k_r: Tensor, v: Tensor, win_q: Tensor, win_k: Tensor, win_v: Tensor,
    shift: Tensor,
) -> tuple[Tensor, Tensor]:
    """Attention of one block of queries with the flat embedding (arguments: :func:`flat_block_logits`).

    Returns the block's ``sum_j p_ij v_j`` and ``sum_j p_ij r_v[i - j]``.
    """
    logits, skew = flat_block_logits(q_k, q_r, k, k_r, win_q, win_k, shift)
    attn = softmax_f32(logits).to(v.dtype)
    values = attn @ v
    spread = attn.new_zeros(*attn.shape[:-1], win_v.shape[-1]).scatter(-1, skew, attn)
    return values, spread @ win_v.t()


def flat_blocked_attention(
    q_k: Tensor, q_r: Tensor, k: Tensor, k_r: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, shift: Tensor,
    block: int,
) -> tuple[Tensor, Tensor]:
    """:class:`FlatBlockedAttention`'s function for torch.compile / torch.export, which capture no
    ``autograd.grad`` inside a backward: the same query blocks, each under non-reentrant checkpointing where
    a gradient is needed (recomputed in backward, so memory stays ``O(block * HW)``), joined by ``cat``."""
    num = k.shape[-2]
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q_k, q_r, k, k_r, v, tq, tk, tv, shift))
    values, value_embeds = [], []
    for start in range(0, num, block):
        rows = slice(start, start + block)
        wq, wk = flat_windows(start, min(block, num - start), num)
        args = (q_k[:, :, rows], q_r[:, :, rows], k, k_r, v, tq[:, wq], tk[:, wk], tv[:, wq], shift)
        if recompute:
            out, embed = checkpoint(flat_attention_block, *args, use_reentrant=False)
        else:
            out, embed = flat_attention_block(*args)
        values.append(out)
        value_embeds.append(embed)
    return torch.cat(values, dim=2), torch.cat(value_embeds, dim=2)


class FlatBlockedAttention(torch.autograd.Function):
    """The flat binary term over query blocks, recomputing each block in backward.

    Only the inputs are saved; each block's ``(B, P)`` logits exist only while that block is computed, in
    the forward and again in the backward (flash-attention style, with autograd doing each block's
    backward). Outputs and gradients go to preallocated tensors, so the allocator reuses one block's
    memory for the next.
    """

    @staticmethod
    def forward(ctx, q_k, q_r, k, k_r, v, tq, tk, tv, shift, block):
        num = k.shape[-2]
        values = v.new_empty(*q_k.shape[:-1], v.shape[-1])
        value_embed = v.new_empty(*q_k.shape[:-1], tv.shape[0])
        for start in range(0, num, block):
            rows = slice(start, start + block)
            wq, wk = flat_windows(start, min(block, num - start), num)
            values[:, :, rows], value_embed[:, :, rows] = flat_attention_block(
                q_k[:, :, rows], q_r[:, :, rows], k, k_r, v, tq[:, wq], tk[:, wk], tv[:, wq], shift
            )
        ctx.save_for_backward(q_k, q_r, k, k_r, v, tq, tk, tv, shift)
        ctx.block = block
        return values, value_embed

    @staticmethod
    @once_differentiable  # the saved probabilities carry no graph: a second derivative would be wrong
    def backward(ctx, grad_values, grad_value_embed):
        q_k, q_r, k, k_r, v, tq, tk, tv, shift = ctx.saved_tensors
        num, block = k.shape[-2], ctx.block
        grads = [torch.zeros_like(t) for t in (q_k, q_r, k, k_r, v, tq, tk, tv, shift)]
        shared = [t.detach().requires_grad_() for t in (k, k_r, v)]
        shift_leaf = shift.detach().requires_grad_()
        for start in range(0, num, block):
            rows = slice(start, start + block)
            wq, wk = flat_windows(start, min(block, num - start), num)
            leaves = [q_k[:, :, rows], q_r[:, :, rows], *shared, tq[:, wq], tk[:, wk], tv[:, wq]]
            leaves[:2] = [t.detach().requires_grad_() for t in leaves[:2]]
            leaves[5:] = [t.detach().requires_grad_() for t in leaves[5:]]
            leaves.append(shift_leaf)
            with torch.enable_grad():
                outs = flat_attention_block(*leaves)
                parts = torch.autograd.grad(outs, leaves, (grad_values[:, :, rows], grad_value_embed[:, :, rows]))
            grads[0][:, :, rows] = parts[0]
            grads[1][:, :, rows] = parts[1]
            for acc, part in zip(grads[2:5] + grads[8:], parts[2:5] + parts[8:]):
                acc += part
            grads[5][:, wq] += parts[5]
            grads[6][:, wk] += parts[6]
            grads[7][:, wq] += parts[7]
        return (*grads, None)


def skew(x: Tensor) -> Tensor:
    """``(..., B, P+B-1)`` -> ``(..., B, P)`` view with ``[t, j] = x[t, B-1-t+j]`` (no copy; the last two
    dimensions of ``x`` contiguous).

    For queries ``i = s + t`` of a block starting at ``s`` and ``x = q_block @ table.flip(-1)[:, w]`` with
    the window ``w = flat_window(s, B, P)``, entry ``[t, j]`` is ``q_i . table[:, i - j + P - 1]``: the
    relative logits of a ``(d, 2P-1)`` offset table, without expanding it to ``(d, P, P)``. In the flattened
    rows (length ``L = P+B-1``) entry ``[t, j]`` sits at ``t (L-1) + B-1 + j``: rows of length ``L-1``
    starting ``B-1`` in, of which the first ``P`` columns (slices and views only, so graph capture takes it).
    """
    block, length = x.shape[-2], x.shape[-1]
    if block == 1:  # rows of length L-1 would be one short; one row needs no shift
        return x
    flat = x.flatten(-2)[..., block - 1:block - 1 + block * (length - 1)]
    return flat.unflatten(-1, (block, length - 1))[..., :length - block + 1]


class Unskewed:
    """The adjoint of :func:`skew`: ``(..., B, P)`` -> ``(..., B, P+B-1)``, zeros with ``a`` in the skewed
    view, so that ``unskewed(a) @ table.flip(-1)[:, w].t()`` is ``sum_j a_tj table[:, i - j + P - 1]``.

    One zeroed buffer per block shape: every block writes the same band (the rest stays zero), so a buffer
    is filled once per kernel call, not once per block. Use each result before the next call of that shape.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.Size, Tensor] = {}

    def __call__(self, a: Tensor) -> Tensor:
        out = self.buffers.get(a.shape)
        if out is None:
            out = self.buffers[a.shape] = a.new_zeros(*a.shape[:-1], a.shape[-1] + a.shape[-2] - 1)
        skew(out).copy_(a)
        return out


def flat_window(start: int, block: int, num: int) -> slice:
    """Columns of a flipped ``(d, 2P-1)`` table used by queries (or keys) ``start : start+block``."""
    return slice(num - start - block, 2 * num - 1 - start)


def dense_blocks(num: int, batch: int, device: torch.device = CPU,
                 dtype: torch.dtype = torch.float32) -> list[tuple[slice, slice]]:
    """Row blocks ``(rows, table window)`` for :class:`FlatDenseAttention` over ``num`` positions and ``batch``
    matrices (batch x heads), as :func:`~lesa.layers.rel2d_attention.block_sizes` sizes them for ``device``:
    temporaries ``(batch, B, P+B-1)`` of about half a million elements on a CPU, as large as memory allows on
    CUDA."""
    size = block_sizes(device, dtype, batch, num).dense_rows
    return [(slice(s, s + size), flat_window(s, min(size, num - s), num)) for s in range(0, num, size)]


def outer_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum over (N, G, rows) of a^T b`` for ``(N, G, R, x)`` and ``(N, G, R, y)``: ``(x, y)``."""
    return a.reshape(-1, a.shape[-1]).t() @ b.reshape(-1, b.shape[-1])


def dense_attention(q_k: Tensor, q_r: Tensor, k: Tensor, k_r: Tensor, v: Tensor, tq: Tensor, tk: Tensor,
                    tv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of :class:`FlatDenseAttention`: ``(values, value_embed, attn)``, ``attn`` the ``(N, G, P, P)``
    softmax probabilities its backward (:func:`dense_attention_backward`) reads."""
    tq_f, tk_f, tv_f = tq.flip(-1), tk.flip(-1), tv.flip(-1)
    blocks = dense_blocks(k.shape[-2], q_k.shape[:-2].numel(), q_k.device, q_k.dtype)
    unskew_block = Unskewed()
    # the logit BN's per-head shift is constant along each softmax row: it changes nothing and is not added
    logits = torch.matmul(q_k, k.transpose(-1, -2))
    key_term = torch.empty_like(logits)  # transposed, built by rows, added at once: no column-block writes
    for rows, win in blocks:
        logits[..., rows, :] += skew(torch.matmul(q_r[..., rows, :], tq_f[:, win]))
        key_term[..., rows, :] = skew(torch.matmul(k_r[..., rows, :], tk_f[:, win]))
    logits += key_term.transpose(-1, -2)
    del key_term
    attn = softmax_f32(logits).to(v.dtype)
    del logits
    values = torch.matmul(attn, v)
    value_embed = v.new_empty(*v.shape[:-1], tv.shape[0])
    for rows, win in blocks:
        value_embed[..., rows, :] = torch.matmul(unskew_block(attn[..., rows, :]), tv_f[:, win].t())
    return values, value_embed, attn


def dense_attention_backward(grad_values: Tensor, grad_value_embed: Tensor, q_k: Tensor, q_r: Tensor, k: Tensor,
                             k_r: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                             attn: Tensor) -> tuple[Tensor, ...]:
    """Gradients of :func:`dense_attention` for ``q_k, q_r, k, k_r, v, tq, tk, tv``: every one a matrix
    product, the relative terms through table windows and skewed views, by row blocks."""
    tq_f, tk_f, tv_f = tq.flip(-1), tk.flip(-1), tv.flip(-1)
    blocks = dense_blocks(k.shape[-2], q_k.shape[:-2].numel(), q_k.device, q_k.dtype)
    unskew_block = Unskewed()
    grad_attn = torch.matmul(grad_values, v.transpose(-1, -2))
    grad_tv = torch.zeros_like(tv_f)
    for rows, win in blocks:
        grad_attn[..., rows, :] += skew(torch.matmul(grad_value_embed[..., rows, :], tv_f[:, win]))
        grad_tv[:, win] += outer_sum(unskew_block(attn[..., rows, :]), grad_value_embed[..., rows, :]).t()
    grad_v = torch.matmul(attn.transpose(-1, -2), grad_values)
    # softmax backward, in place; its rows sum to zero, so the per-row shift gets no gradient
    row_dot = torch.matmul(grad_attn.unsqueeze(-2), attn.unsqueeze(-1)).squeeze(-1)
    grad_logits = grad_attn.sub_(row_dot).mul_(attn)
    grad_q_k = torch.matmul(grad_logits, k)
    grad_k = torch.matmul(grad_logits.transpose(-1, -2), q_k)
    grad_q_r, grad_k_r = torch.empty_like(q_r), torch.empty_like(k_r)
    grad_tq, grad_tk = torch.zeros_like(tq_f), torch.zeros_like(tk_f)
    for rows, win in blocks:
        spread = unskew_block(grad_logits[..., rows, :])
        grad_q_r[..., rows, :] = torch.matmul(spread, tq_f[:, win].t())
        grad_tq[:, win] += outer_sum(q_r[..., rows, :], spread)
        spread = unskew_block(grad_logits[..., rows].transpose(-1, -2))
        grad_k_r[..., rows, :] = torch.matmul(spread, tk_f[:, win].t())
        grad_tk[:, win] += outer_sum(k_r[..., rows, :], spread)
    return grad_q_k, grad_q_r, grad_k, grad_k_r, grad_v, grad_tq.flip(-1), grad_tk.flip(-1), grad_tv.flip(-1)


class FlatDenseAttention(torch.autograd.Function):
    """The flat binary term with all ``(N, G, P, P)`` logits at once and the softmax probabilities saved
    for a hand-written backward: every gradient is a matrix product, the relative terms come through
    windows of the offset tables and skewed views (:func:`skew`), processed in row blocks. Nothing of the
    reference path's stacked ``(N, 3G, P, P)`` logits, their BatchNorm or Toeplitz-expanded tables.
    Used where the whole matrix is small (see :meth:`BinaryAttention2d.attend_fused`). Arguments as
    :class:`FlatBlockedAttention`. The key-side relative term ``k_j . r_k[j - i]`` is built transposed, by
    blocks of keys, the query-side ones by blocks of queries; the logit BN's shift only enters the graph
    (the BN's bias takes part, as DistributedDataParallel expects) and gets its zero gradient.
    """

    @staticmethod
    def forward(ctx, q_k, q_r, k, k_r, v, tq, tk, tv, shift):
        values, value_embed, attn = dense_attention(q_k, q_r, k, k_r, v, tq, tk, tv)
        ctx.save_for_backward(q_k, q_r, k, k_r, v, tq, tk, tv, shift, attn)
        return values, value_embed

    @staticmethod
    @once_differentiable  # the saved probabilities carry no graph: a second derivative would be wrong
    def backward(ctx, grad_values, grad_value_embed):
        *inputs, shift, attn = ctx.saved_tensors
        return (*dense_attention_backward(grad_values, grad_value_embed, *inputs, attn), torch.zeros_like(shift))


# Under torch.compile the dense kernel is one opaque operator, forward and backward: traced, inductor fuses
# its skewed views and softmax into C++ loops that ran the layer's training step 1.6x slower than eager on
# the CPU (docs/performance.md, "torch.compile"). Its outputs are channel-major, ``(N, G, dv, P)``: the
# layout of the output BatchNorm, whose statistics inductor otherwise gathers element by element from the
# position-major rows. torch.library.custom_op exists from torch 2.4.
if hasattr(torch.library, "custom_op"):
    # inductor passes the operands with eager's strides (the tag is needs_fixed_stride_order before torch 2.7)
    _STRIDES = tuple(tag for tag in (getattr(torch.Tag, "needs_exact_strides", None)
                                     or getattr(torch.Tag, "needs_fixed_stride_order", None),) if tag is not None)

    @torch.library.custom_op("lesa::flat_dense_attention", mutates_args=(), tags=_STRIDES)
    def _dense_op(q_k: Tensor, q_r: Tensor, k: Tensor, k_r: Tensor, v: Tensor, tq: Tensor, tk: Tensor,
                  tv: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, value_embed, attn = dense_attention(q_k, q_r, k, k_r, v, tq, tk, tv)
        return values.mT.contiguous(), value_embed.mT.contiguous(), attn

    @_dense_op.register_fake
    def _(q_k, q_r, k, k_r, v, tq, tk, tv, shift):
        *batch, num, _ = q_k.shape
        return (v.new_empty(*batch, v.shape[-1], num), v.new_empty(*batch, tv.shape[0], num),
                v.new_empty(*batch, num, num))

    @torch.library.custom_op("lesa::flat_dense_attention_backward", mutates_args=(), tags=_STRIDES)
    def _dense_backward_op(grad_values: Tensor, grad_value_embed: Tensor, q_k: Tensor, q_r: Tensor, k: Tensor,
                           k_r: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                           attn: Tensor) -> list[Tensor]:
        return list(dense_attention_backward(grad_values.mT, grad_value_embed.mT, q_k, q_r, k, k_r, v, tq, tk,
                                             tv, attn))

    @_dense_backward_op.register_fake
    def _(grad_values, grad_value_embed, q_k, q_r, k, k_r, v, tq, tk, tv, attn):
        return [torch.empty_like(t) for t in (q_k, q_r, k, k_r, v, tq, tk, tv)]

    def _setup_dense(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[2])

    def _dense_grads(ctx, grad_values, grad_value_embed, _grad_attn):
        *inputs, shift, attn = ctx.saved_tensors
        return (*_dense_backward_op(grad_values, grad_value_embed, *inputs, attn), torch.zeros_like(shift))

    _dense_op.register_autograd(_dense_grads, setup_context=_setup_dense)


def flat_dense_attention(q_k: Tensor, q_r: Tensor, k: Tensor, k_r: Tensor, v: Tensor, tq: Tensor, tk: Tensor,
                         tv: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`FlatDenseAttention` in eager mode; under torch.compile the same kernel as an opaque operator
    (``lesa::flat_dense_attention``, torch >= 2.4), which the compiled graph calls as eager code runs it."""
    if torch.compiler.is_compiling() and hasattr(torch.library, "custom_op"):
        heads = q_k.shape[:2]
        values, value_embed, _ = _dense_op(*(t.flatten(0, 1) for t in (q_k, q_r, k, k_r, v)), tq, tk, tv, shift)
        return values.unflatten(0, heads).mT, value_embed.unflatten(0, heads).mT
    return FlatDenseAttention.apply(q_k, q_r, k, k_r, v, tq, tk, tv, shift)
