"""The binary (context) term: multi-head all-to-all attention with relative position embeddings.

This is the sum in Eq. 5 of "Locally Enhanced Self-Attention: Combining Self-Attention and Convolution as
Local and Context Terms" (arXiv 2107.05637), ``sum_(h,w) S(q_ij^T k_hw + q_ij^T r) v_hw`` (Eq. 1 with the
position term), built exactly as the authors' code builds it:

* ``qkv``: a 1x1 projection to per-head ``q, k`` (width ``out/heads/2``) and ``v`` (width ``out/heads``),
  followed by BatchNorm (``bn_qkv``);
* the similarity logits ``q.k`` and the position logits are stacked as separate channels, normalised by a
  BatchNorm (``bn_logits``) and summed -- there is no ``1/sqrt(d)``; the BN sets the temperature;
* softmax over keys, weighted sum of values (plus, for ``pos_embed='flat'``, of the value embeddings),
  then a BatchNorm on the output (``bn_out``; with 'flat' the value and value-embedding parts are
  normalised as separate interleaved channels and summed).

Two implementations compute the same function, parameters, gradients and BN statistics:

* ``impl='reference'`` materialises the ``(N, heads, HW, HW)`` logits, as the official code does.
* ``impl='fused'`` never does. Since softmax is shift invariant, the logit BN reduces to one scale per
  head and term; in training that scale needs the batch variance of the logits, which follows from
  moments of ``q``, ``k`` and the relative logits (:mod:`lesa.layers.bn_moments`). Then:

  - ``'rel2d'``: ``q_i.r_h[y_j-y_i] + q_i.r_w[x_j-x_i]`` is the dot product of ``q_i`` extended with its
    ``H + W`` relative logits and ``k_j`` extended with one-hot row/column indicators, so the whole term
    runs in flash / memory-efficient attention kernels (:mod:`lesa.layers.rel2d_attention`,
    ``O(HW (d + H + W))`` memory).
  - ``'flat'``: its logits have no such low-rank form (:mod:`lesa.layers.flat_attention`): all logits at
    once where they are small, else queries in blocks recomputed in backward, ``O(block * HW)`` memory.

This module holds the layer, its input checks and the reference path; the kernels live in
:mod:`lesa.layers.flat_attention` and :mod:`lesa.layers.rel2d_attention`, the padded batches' masks in
:mod:`lesa.layers.padding`, the checks that pick or refuse a path in :mod:`lesa.layers.guards`, the analysis'
attention rows and Table 1's ablation in :mod:`lesa.layers.inspection`.

``impl='auto'`` uses the fused path where it is faster (see ``docs/performance.md``).

Graph capture (see :func:`graph_mode`): TorchScript, torch.fx and ``torch.jit.trace`` graphs run the
reference path (the same function, in code they take: no size-dependent choice of path, no custom autograd
function), with the input checks as ``torch._assert``; ``torch.compile`` and ``torch.export`` run the
chosen path, the fused one in forms they capture whole (``'flat'``: the dense kernel where one block
holds all queries, except under export; checkpointed query blocks instead of :class:`FlatBlockedAttention`;
``'rel2d'`` under export: one public attention call, no private kernel).

Padded batches (detection, :mod:`lesa.layers.padding`): given each image's valid size on the map
(``forward(x, valid_size)``, or the :func:`~lesa.layers.padding.batch_padding` context the detection
backbone opens), the term attends only to keys inside the image, and its BatchNorms count
only what lies inside in their batch statistics (training): ``bn_qkv`` and ``bn_out`` the positions inside,
``bn_logits`` the pairs (query inside, key inside) -- :mod:`lesa.layers.bn_moments`. Queries in the padding
get finite outputs (attention over the image's keys) that no output inside depends on. The reference path
sets the padded keys' logits to ``-inf``; the fused 'rel2d' path zeroes them and gives them a large negative
row / column logit on the one-hot columns (:data:`~lesa.layers.rel2d_attention.MASKED_LOGIT`), so the flash
kernels still serve. 'flat' (classification, one fixed map size) takes no mask. Without one, every path is as before.
"""
from __future__ import annotations

from typing import Literal, Optional, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError, InputError
from .bn_moments import (
    bn_logit_affine,
    dot_product_moments,
    interleaved_batch_norm,
    masked_batch_norm,
    masked_bn_logit_affine,
    masked_dot_product_moments,
    masked_separable_moments,
    running_affine,
    separable_moments,
    sliding_window_moments,
    stats_dtype,
    uses_batch_stats,
)
from .checks import check_choice, check_input, check_int, graph_mode
from .factory import takes_factory_kwargs
from .flat_attention import FlatBlockedAttention, flat_blocked_attention, flat_dense_attention, softmax_f32
from .guards import check_reference_memory, syncs_batch_stats
from .inspection import remove_self_term
from .padding import KeyMask, in_batch_padding, masked_norm, padding_mask
from .rel2d_attention import MASKED_LOGIT, block_sizes, exporting, rel2d_attention
from .rel_pos import FlatRelPosEmbed, RelPosEmbed2d, Size2d

PosEmbed = Literal["flat", "rel2d"]
Impl = Literal["reference", "fused", "auto"]
POS_EMBEDS: tuple[str, ...] = get_args(PosEmbed)  # the choices, for checks and the command line
IMPLS: tuple[str, ...] = get_args(Impl)

# 'auto' uses the linear-memory fused path from this many positions on, where it is faster than the
# reference (benchmarks/bench_layer.py, docs/performance.md). Below, the (HW)^2 matrices are small: 'rel2d'
# takes the reference path, 'flat' the fused path in one block ('dense': FlatDenseAttention).
FUSED_MIN_POSITIONS = {"rel2d": 256, "flat": 400}


def resolve_auto(pos_embed: str, positions: int) -> str:
    if positions >= FUSED_MIN_POSITIONS[pos_embed]:
        return "fused"
    return "dense" if pos_embed == "flat" else "reference"


def check_heads(in_channels: int, out_channels: int, heads: int) -> None:
    """Channels and heads as ints >= 1 where the grouped conv needs ``in/out % heads == 0`` and q and k an
    even per-head width.

    Raises:
        ConfigError: naming the argument and the heads that would fit.
    """
    check_int("in_channels", in_channels)
    check_int("out_channels", out_channels)
    check_int("heads", heads)
    if out_channels % (2 * heads) != 0:
        raise ConfigError(
            f"out_channels={out_channels} must be divisible by 2*heads={2 * heads}: each head gets "
            f"out_channels/heads value channels and half as many query/key channels. {_heads_advice(out_channels)}"
        )
    if in_channels % heads != 0:
        raise ConfigError(
            f"in_channels={in_channels} must be divisible by heads={heads} (the unary term is a grouped "
            "convolution with one group per head)."
        )


def _heads_advice(out_channels: int) -> str:
    fitting = [h for h in (1, 2, 4, 8, 16, 32) if out_channels % (2 * h) == 0]
    if fitting:
        return f"Choose heads among {fitting}."
    return f"An odd out_channels fits no head count: choose an even one (e.g. {out_channels + 1})."


class BinaryAttention2d(nn.Module):
    """Multi-head all-to-all attention of the LESA / SA layers (see module docstring).

    Raises:
        ConfigError: an argument of the wrong type, out of range or not among its choices (one line naming it).
        InputError: (forward) an input that is not ``(N, in_channels, H, W)`` of the parameters' dtype and device.
    """

    @takes_factory_kwargs
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 8,
        pos_embed: PosEmbed = "flat",
        feature_size: Size2d = 14,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        check_choice("pos_embed", pos_embed, POS_EMBEDS)
        check_choice("impl", impl, IMPLS)
        check_heads(in_channels, out_channels, heads)
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.qk_dim = out_channels // heads // 2
        self.v_dim = out_channels // heads
        self.pos_embed, self.impl = pos_embed, impl
        # logits per query block (N * heads * block * HW) where blocks are used; None: the device's policy
        self.block_elems: Optional[int] = None
        self.ablate_unary = False  # Table 1: drop each query's own term (eval only; inspect.ablate_unary)
        self.folded = False  # BatchNorms folded for inference (fold_batch_norms)

        self.qkv = nn.Conv2d(in_channels, 2 * out_channels, kernel_size=1, bias=False)
        self.bn_qkv = nn.BatchNorm2d(2 * out_channels)
        terms = 3 if pos_embed == "flat" else 2
        self.bn_logits = nn.BatchNorm2d(terms * heads)
        self.bn_out = nn.BatchNorm2d(out_channels * (2 if pos_embed == "flat" else 1))
        if pos_embed == "flat":
            self.rel_pos: nn.Module = FlatRelPosEmbed(self.qk_dim, self.v_dim, feature_size)
        else:
            self.rel_pos = RelPosEmbed2d(self.qk_dim, feature_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.qkv.weight, 0.0, self.in_channels**-0.5)
        self.rel_pos.reset_parameters()

    # -- shared pieces -------------------------------------------------------------------------------
    def resolve_impl(self, height: int, width: int, masked: bool = False) -> str:
        """The path a forward at ``height x width`` takes: ``impl``, with 'auto' by map size; for an unpadded
        batch, the reference path whatever ``impl`` says while ``bn_logits`` or ``bn_out`` is a SyncBatchNorm
        taking batch statistics across processes (:func:`~lesa.layers.guards.syncs_batch_stats`), because the
        fused paths' BN moments are those of the local batch. (A padded batch's BN moments are the local batch's
        on every path: they are taken over what lies inside the images.)"""
        if not masked and syncs_batch_stats(self.bn_logits, self.bn_out):
            return "reference"
        return resolve_auto(self.pos_embed, height * width) if self.impl == "auto" else self.impl

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(N, C, H, W)`` -> ``q, k: (N, G, HW, d)`` and ``v: (N, G, HW, dv)``."""
        return self.split_qkv(self.bn_qkv(self.qkv(x)))

    def split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The normalised projection ``(N, 2 * out_channels, H, W)`` -> per-head ``q, k, v``."""
        n, _, h, w = qkv.shape
        qkv = qkv.reshape(n, self.heads, 2 * self.qk_dim + self.v_dim, h * w)
        # one copy to position-major rows: every later product, reduction and row slice then reads
        # contiguous memory (as strided views they cost 5% of a lesa_resnet50 training step)
        q, k, v = torch.split(qkv.transpose(-1, -2).contiguous(), [self.qk_dim, self.qk_dim, self.v_dim], dim=-1)
        return q, k, v

    def finish(self, values: Tensor, value_embed: Optional[Tensor], height: int, width: int,
               stacked: bool = True, mask: Optional[KeyMask] = None) -> Tensor:
        """``(N, G, HW, dv)`` attention outputs -> ``bn_out`` -> ``(N, C, H, W)``. ``stacked``: the official
        computation, ``bn_out`` over the interleaved stacked halves (the reference path; TorchScript and torch.fx
        graphs); else :func:`~lesa.layers.bn_moments.interleaved_batch_norm`, the same function without the
        stacked copy (the fused paths). A padded batch's ``mask`` ('rel2d': no value embedding; eager only):
        ``bn_out``'s batch statistics over the positions inside the images."""
        n = values.shape[0]
        if not torch.jit.is_scripting():
            if self.folded:
                return self.finish_folded(values, value_embed, height, width)
            if mask is not None:
                out = values.transpose(-1, -2).reshape(n, self.out_channels, height, width)
                return masked_norm(self.bn_out, out, mask)
        out = values.transpose(-1, -2)  # (N, G, dv, HW): channel = head * dv + c, as the official code
        if value_embed is None:
            return self.bn_out(out.reshape(n, self.out_channels, height, width))
        # bn_out's channel (head*dv + c)*2 + part, as the official code stacks them
        if not torch.jit.is_scripting():
            if not stacked:
                shape = (n, self.out_channels, height, width)
                return interleaved_batch_norm(self.bn_out, out.reshape(shape),
                                              value_embed.transpose(-1, -2).reshape(shape))
        stacked = torch.stack([out, value_embed.transpose(-1, -2)], dim=3)
        normed = self.bn_out(stacked.reshape(n, 2 * self.out_channels, height, width))
        return normed.view(n, self.out_channels, 2, height, width).sum(2)

    def finish_folded(self, values: Tensor, value_embed: Optional[Tensor], height: int, width: int) -> Tensor:
        """:meth:`finish` after :meth:`fold_batch_norms`: ``bn_out`` lives in ``v`` (and, for 'flat', in
        ``value_embed_scale``)."""
        shape = (values.shape[0], self.out_channels, height, width)
        out = values.transpose(-1, -2).reshape(shape)
        if value_embed is None:
            return out
        embed = value_embed.transpose(-1, -2).reshape(shape)
        return torch.addcmul(out, self.value_embed_scale.view(1, -1, 1, 1), embed)

    @torch.no_grad()
    def fold_batch_norms(self) -> None:
        """Fold ``bn_qkv`` and ``bn_out`` (eval statistics) into the ``qkv`` convolution, for inference.

        ``bn_out`` normalises each output channel ``c`` of head ``g``: ``a_c sum_j p_ij v_jc + b_c``. The
        attention rows sum to one, so this is ``sum_j p_ij (a_c v_jc + b_c)``: scaling and shifting ``v``.
        With 'flat' the value-embedding part keeps its per-channel scale (the table is shared by the heads),
        its shift joins ``v``'s. The logit BN needs nothing: eval mode already reduces it to per-head scales.
        """
        if self.folded:
            return
        if self.training:
            raise RuntimeError("fold_batch_norms() uses the running statistics: call .eval() first")
        qkv = fuse_conv_bn_eval(self.qkv, self.bn_qkv)
        bn = self.bn_out
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if self.pos_embed == "flat":  # channels interleaved (value, value embedding) per output channel
            self.register_buffer("value_embed_scale", scale[1::2].clone())
            scale, shift = scale[0::2], shift[0::2] + shift[1::2]
        rows = 2 * self.qk_dim + self.v_dim
        weight = qkv.weight.view(self.heads, rows, -1)
        bias = qkv.bias.view(self.heads, rows)
        weight[:, 2 * self.qk_dim:] *= scale.view(self.heads, self.v_dim, 1)
        bias[:, 2 * self.qk_dim:] = bias[:, 2 * self.qk_dim:] * scale.view(self.heads, -1) + shift.view(self.heads, -1)
        self.qkv, self.bn_qkv, self.bn_out = qkv, nn.Identity(), nn.Identity()
        self.folded = True

    def forward(self, x: Tensor, valid_size: Optional[Tensor] = None) -> Tensor:
        """``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``. ``valid_size``: ``(N, 2)`` integer
        ``(h, w)`` of each image in the top-left of the padded map (see the module docstring); default: from
        :func:`~lesa.layers.padding.batch_padding` where one is open, else no padding."""
        check_input(x, self.in_channels, "BinaryAttention2d", self.qkv.weight)
        if torch.jit.is_scripting():
            torch._assert(valid_size is None, "padding masks run in eager mode and under torch.compile / export")
            return self.forward_reference(x)
        if graph_mode(x) == "symbolic":
            if valid_size is not None or in_batch_padding():
                raise InputError("padding masks run in eager mode and under torch.compile / torch.export, not in "
                                 "torch.fx or torch.jit.trace graphs: run the padded batch without tracing")
            return self.forward_reference(x)
        height, width = x.shape[-2:]
        self.rel_pos.check_size(height, width)
        mask = self.key_mask(x, valid_size)
        q, k, v = self.split_qkv(masked_norm(self.bn_qkv, self.qkv(x), mask))
        impl = self.resolve_impl(height, width, masked=mask is not None)
        if impl == "reference":
            check_reference_memory(q, 3 if self.pos_embed == "flat" else 2)
            values, value_embed = self.attend_reference(q, k, v, height, width, mask)
        else:
            values, value_embed = self.attend_fused(q, k, v, height, width, dense=impl == "dense", mask=mask)
        if self.ablate_unary:
            values, value_embed = remove_self_term(self, q, k, v, values, value_embed, height, width, mask)
        return self.finish(values, value_embed, height, width, stacked=impl == "reference", mask=mask)

    def key_mask(self, x: Tensor, valid_size: Optional[Tensor]) -> Optional[KeyMask]:
        """:func:`~lesa.layers.padding.padding_mask` of ``x``: ``None`` for an unpadded batch.

        Raises:
            ConfigError: a mask for a 'flat' layer (its tables fix the map size: nothing is padded).
            InputError: a ``valid_size`` that is not an ``(N, 2)`` integer tensor.
        """
        mask = padding_mask(x, valid_size)
        if mask is not None and self.pos_embed == "flat":
            raise ConfigError("pos_embed='flat' takes no padding mask (its tables fix one map size): build the "
                              "model with pos_embed='rel2d' for padded batches, as the detection backbones are")
        return mask

    def forward_reference(self, x: Tensor) -> Tensor:
        """The reference path alone, as TorchScript and torch.fx take it (the input is already checked)."""
        height, width = x.shape[-2], x.shape[-1]
        self.rel_pos.assert_size(height, width)
        q, k, v = self.project_qkv(x)
        values, value_embed = self.attend_reference(q, k, v, height, width)
        return self.finish(values, value_embed, height, width)

    # -- reference: materialised logits ---------------------------------------------------------------
    def reference_logits(self, q: Tensor, k: Tensor, height: int, width: int,
                         mask: Optional[KeyMask] = None) -> Tensor:
        """The summed, BN-normalised ``(N, G, HW, HW)`` logits, exactly as the official code forms them. A
        padded batch's ``mask`` (eager only): BN statistics over the pairs inside the images, ``-inf`` for the
        padded keys."""
        n, g, num = q.shape[0], q.shape[1], q.shape[2]
        terms = [q @ k.transpose(-1, -2)] + self.rel_pos.reference_logits(q, k, height, width)
        stacked = torch.cat(terms, dim=1)
        if not torch.jit.is_scripting():
            if mask is not None:
                stacked = masked_batch_norm(self.bn_logits, stacked, mask.pairs())
                logits = stacked.view(n, len(terms), g, num, num).sum(1)
                return logits.masked_fill(~mask.positions()[:, None, None, :], float("-inf"))
        return self.bn_logits(stacked).view(n, len(terms), g, num, num).sum(1)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, height: int, width: int,
                         mask: Optional[KeyMask] = None) -> tuple[Tensor, Optional[Tensor]]:
        attn = softmax_f32(self.reference_logits(q, k, height, width, mask)).to(v.dtype)
        return attn @ v, self.rel_pos.reference_values(attn)

    # -- fused: no (HW)^2 tensor ----------------------------------------------------------------------
    def logit_affine(self, q: Tensor, k: Tensor, rel=None, mask: Optional[KeyMask] = None) -> tuple[Tensor, Tensor]:
        """The logit BN as per-term, per-head scales ``(terms, G)`` and one summed shift per head
        ``(1, G, 1, 1)``; updates the BN's running statistics in training (with a ``mask``: over the pairs
        inside the images).

        The shift is constant along each softmax row, so it does not change the output; it is kept so
        that the fused path computes literally the reference's logits (and every parameter, the BN's
        bias too, takes part in the graph, as DistributedDataParallel expects).
        """
        dtype = stats_dtype(q)
        terms = 3 if self.pos_embed == "flat" else 2
        if mask is not None and uses_batch_stats(self.bn_logits):
            scale, shift = self.masked_logit_affine(q.to(dtype), k.to(dtype), rel, mask)
        elif uses_batch_stats(self.bn_logits):
            qs, ks = q.to(dtype), k.to(dtype)
            moments = [dot_product_moments(qs, ks)]
            if self.pos_embed == "flat":
                tq, tk, _ = self.rel_pos.tables()
                moments.append(sliding_window_moments(qs, tq.to(dtype)))
                moments.append(sliding_window_moments(ks, tk.to(dtype)))
            else:
                rows, cols = rel
                moments.append(separable_moments(rows.to(dtype), cols.to(dtype)))
            scale, shift = bn_logit_affine(self.bn_logits, moments, q.shape[-2] ** 2)
        else:  # eval: the running statistics fix the scales; no moments needed
            scale, shift = running_affine(self.bn_logits, dtype)
        shift = shift.view(terms, self.heads).sum(0).view(1, -1, 1, 1)
        return scale.view(terms, self.heads).to(q.dtype), shift.to(q.dtype)

    def masked_logit_affine(self, q: Tensor, k: Tensor, rel: tuple[Tensor, Tensor],
                            mask: KeyMask) -> tuple[Tensor, Tensor]:
        """The 'rel2d' logit BN's batch ``(scale, shift)`` over the pairs inside each image (``V^2`` of them)."""
        rows, cols = (r.to(q.dtype) for r in rel)
        inside = mask.positions().to(q.dtype)
        count = inside.sum(-1, keepdim=True)  # (N, 1): V
        moments = [masked_dot_product_moments(q, k, inside[:, None, :, None], count),
                   masked_separable_moments(rows, cols, mask.rows.to(q.dtype)[:, None, None],
                                            mask.cols.to(q.dtype)[:, None, None], inside.unsqueeze(1))]
        return masked_bn_logit_affine(self.bn_logits, moments, count.square())

    def fused_operands(self, q: Tensor, k: Tensor, height: int, width: int,
                       mask: Optional[KeyMask] = None) -> dict[str, Tensor]:
        """What the fused path attends with: the BN-scaled, position-augmented queries and keys
        (``'rel2d'``; a ``mask`` zeroes the padded keys and puts their rows / columns at ``MASKED_LOGIT``), or
        the scaled queries/keys, tables and shift (``'flat'``)."""
        if self.pos_embed == "flat":
            scale, shift = self.logit_affine(q, k)
            s_qk, s_qr, s_kr = (s.view(1, -1, 1, 1) for s in scale)
            tq, tk, tv = (t.to(q.dtype) for t in self.rel_pos.tables())
            return dict(q_k=q * s_qk, q_r=q * s_qr, k=k, k_r=k * s_kr, tq=tq, tk=tk, tv=tv, shift=shift)
        rows, cols = self.rel_pos.rel_logits(q, height, width)
        scale, shift = self.logit_affine(q, k, rel=(rows, cols), mask=mask)
        s_qk, s_rel = (s.view(1, -1, 1, 1) for s in scale)
        # every key lies in exactly one row, so the per-head shift rides on the row logits
        rows, cols = rows * s_rel + shift, cols * s_rel
        if mask is None:
            return dict(q=q * s_qk, k=k, rows=rows, cols=cols)
        # a padded key lies in a padded row or column: MASKED_LOGIT there, and q.k = 0 (whatever the padding
        # holds), so that exp() of its logit is 0
        rows = rows.masked_fill(~mask.rows[:, None, None, :], MASKED_LOGIT)
        cols = cols.masked_fill(~mask.cols[:, None, None, :], MASKED_LOGIT)
        k = k.masked_fill(~mask.positions()[:, None, :, None], 0)
        return dict(q=q * s_qk, k=k, rows=rows, cols=cols)

    def query_block(self, q: Tensor) -> int:
        """Queries per block of the 'flat' fused path (:func:`~lesa.layers.rel2d_attention.block_sizes`); all of
        them: one block, the dense kernel."""
        n, g, num, _ = q.shape
        if exporting():  # an exported graph takes any batch size: its blocks are sized for one image
            n = 1
        return block_sizes(q.device, q.dtype, n * g, num, query_elems=self.block_elems).queries

    def attend_fused(self, q: Tensor, k: Tensor, v: Tensor, height: int, width: int, dense: bool = False,
                     mask: Optional[KeyMask] = None):
        """The fused path; ``dense``: the flat term in one block of all queries whatever its size."""
        ops = self.fused_operands(q, k, height, width, mask)
        if self.pos_embed != "flat":
            return rel2d_attention(ops["q"], ops["k"], v, ops["rows"], ops["cols"]), None
        args = (ops["q_k"], ops["q_r"], k, ops["k_r"], v, ops["tq"], ops["tk"], ops["tv"], ops["shift"],
                q.shape[-2] if dense else self.query_block(q))
        if args[-1] >= q.shape[-2] and not exporting():  # one block: all logits at once, probabilities kept
            return flat_dense_attention(*args[:-1])        # for the backward
        if torch.compiler.is_compiling():  # FlatBlockedAttention's backward runs autograd inside: not capturable
            return flat_blocked_attention(*args)
        return FlatBlockedAttention.apply(*args)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, heads={self.heads}, "
            f"pos_embed={self.pos_embed!r}, impl={self.impl!r}"
        )
