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
:mod:`lesa.layers.flat_attention` and :mod:`lesa.layers.rel2d_attention`.

``impl='auto'`` uses the fused path where it is faster (see ``docs/performance.md``).

Graph capture (see :func:`graph_mode`): TorchScript, torch.fx and ``torch.jit.trace`` graphs run the
reference path (the same function, in code they take: no size-dependent choice of path, no custom autograd
function), with the input checks as ``torch._assert``; ``torch.compile`` and ``torch.export`` run the
chosen path, the fused one in forms they capture whole (``'flat'``: the dense kernel where one block
holds all queries, except under export; checkpointed query blocks instead of :class:`FlatBlockedAttention`;
``'rel2d'`` under export: one public attention call, no private kernel).

Padded batches (detection): torchvision pads the images of a batch to one size (at the bottom and right).
Given each image's valid size on the map (``forward(x, valid_size)``, or the :func:`batch_padding` context
the detection backbone opens), the term attends only to keys inside the image, and its BatchNorms count
only what lies inside in their batch statistics (training): ``bn_qkv`` and ``bn_out`` the positions inside,
``bn_logits`` the pairs (query inside, key inside) -- :mod:`lesa.layers.bn_moments`. Queries in the padding
get finite outputs (attention over the image's keys) that no output inside depends on. The reference path
sets the padded keys' logits to ``-inf``; the fused 'rel2d' path zeroes them and gives them a large negative
row / column logit on the one-hot columns (:data:`~lesa.layers.rel2d_attention.MASKED_LOGIT`), so the flash
kernels still serve. 'flat' (classification, one fixed map size) takes no mask. Without one, every path is as before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

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
from .checks import check_choice, check_input, check_int, describe, graph_mode
from .flat_attention import (
    FlatBlockedAttention,
    flat_block_logits,
    flat_blocked_attention,
    flat_dense_attention,
    flat_windows,
    softmax_f32,
)
from .rel2d_attention import MASKED_LOGIT, augment_rel2d, block_sizes, exporting, rel2d_attention
from .rel_pos import FlatRelPosEmbed, RelPosEmbed2d, Size2d

PosEmbed = Literal["flat", "rel2d"]
Impl = Literal["reference", "fused", "auto"]

POS_EMBEDS = ("flat", "rel2d")
IMPLS = ("reference", "fused", "auto")
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
            f"out_channels/heads value channels and half as many query/key channels. "
            f"Choose heads among {[h for h in (1, 2, 4, 8, 16, 32) if out_channels % (2 * h) == 0]}."
        )
    if in_channels % heads != 0:
        raise ConfigError(
            f"in_channels={in_channels} must be divisible by heads={heads} (the unary term is a grouped "
            "convolution with one group per head)."
        )


class KeyMask(NamedTuple):
    """The part of each image in a padded ``H x W`` map: the top-left ``h x w`` (torchvision pads at the bottom
    and right). ``rows``: ``(N, H)`` and ``cols``: ``(N, W)`` bool, True for the rows / columns inside."""

    rows: Tensor
    cols: Tensor

    @staticmethod
    def from_valid_size(valid_size: Tensor, height: int, width: int) -> KeyMask:
        """From ``(N, 2)`` valid ``(h, w)``, each at least 1 (an image has a pixel; larger: the whole map)."""
        valid = valid_size.clamp(min=1)
        rows = torch.arange(height, device=valid.device) < valid[:, :1]
        cols = torch.arange(width, device=valid.device) < valid[:, 1:]
        return KeyMask(rows, cols)

    def positions(self) -> Tensor:
        """``(N, H*W)`` bool in raster order: the positions (queries and keys) inside the image."""
        return self.inside().flatten(1)

    def inside(self) -> Tensor:
        """``(N, H, W)`` bool: the map positions inside the image."""
        return self.rows.unsqueeze(-1) & self.cols.unsqueeze(-2)

    def zero_outside(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` with zeros outside the images (what a convolution sees beyond an image alone)."""
        return x.masked_fill(~self.inside().unsqueeze(1), 0)


@dataclass(frozen=True)
class BatchPadding:
    """Each image's size in a padded batch, for the layers inside :func:`batch_padding`.

    ``sizes``: ``(N, 2)`` integer ``(height, width)`` of the images in input pixels, on the batch's device;
    ``padded``: the padded batch's ``(H, W)``.
    """

    sizes: Tensor
    padded: tuple[int, int]

    def valid_size(self, height: int, width: int) -> Tensor:
        """``(N, 2)`` valid size on a ``height x width`` map of the batch: ``ceil(h * height / H)``, which is
        ``ceil(h / stride)`` where the stride divides ``H`` (torchvision pads to multiples of 32)."""
        pad_h, pad_w = self.padded
        return torch.stack([(self.sizes[:, 0] * height + pad_h - 1) // pad_h,
                            (self.sizes[:, 1] * width + pad_w - 1) // pad_w], dim=1)


# The padding of the batch being run, for layers whose callers (timm, torch.fx, export) pass only ``x``. A
# context variable: each thread (and asyncio task) sees its own; torch.compile reads it and guards on it.
_BATCH_PADDING: ContextVar[Optional[BatchPadding]] = ContextVar("lesa_batch_padding", default=None)


@contextlib.contextmanager
def batch_padding(image_sizes: Tensor, padded_size: Sequence[int]) -> Iterator[BatchPadding]:
    """Within the block, every 'rel2d' attention layer run in this thread masks the padding of the batch
    (see the module docstring): ``image_sizes`` ``(N, 2)`` integer ``(height, width)`` of the images in the
    padded input of size ``padded_size`` ``(H, W)``; each layer converts them to its own map size
    (:meth:`BatchPadding.valid_size`). Layers with ``checkpoint=True`` take the mask into their recomputation.
    A 'flat' layer raises :class:`~lesa.errors.ConfigError`.
    """
    padding = BatchPadding(image_sizes, (int(padded_size[0]), int(padded_size[1])))
    token = _BATCH_PADDING.set(padding)
    try:
        yield padding
    finally:
        _BATCH_PADDING.reset(token)


def padding_valid_size(x: Tensor) -> Optional[Tensor]:
    """The valid sizes ``(N, 2)`` on the map ``x`` ``(N, C, H, W)`` inside :func:`batch_padding` (on ``x``'s
    device), else ``None``."""
    padding = _BATCH_PADDING.get()
    return None if padding is None else padding.valid_size(x.shape[-2], x.shape[-1]).to(x.device)


def check_valid_size(valid_size: object, x: Tensor) -> Tensor:
    """An ``(N, 2)`` integer tensor for the batch ``x``, on its device.

    Raises:
        InputError: anything else, naming the expected shape.
    """
    if not isinstance(valid_size, Tensor):
        got = describe(valid_size)
    elif valid_size.shape != (x.shape[0], 2) or valid_size.is_floating_point() or valid_size.is_complex() \
            or valid_size.dtype == torch.bool:
        got = f"a {valid_size.dtype} tensor of shape {tuple(valid_size.shape)}"
    else:
        return valid_size.to(x.device)
    raise InputError(f"valid_size must be an integer tensor of shape ({x.shape[0]}, 2), each image's valid "
                     f"(height, width) on the map, got {got}")


def check_reference_memory(q: Tensor, terms: int) -> None:
    """Refuse, before allocating, a reference-path logit tensor ``(N, terms * G, HW, HW)`` larger than the
    memory that is free on its device, naming the fused path that needs none of it."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    n, g, num, _ = q.shape
    needed = terms * n * g * num * num * q.element_size()
    free = free_memory(q.device)
    if free is not None and needed > free:
        raise ConfigError(
            f"impl='reference' would materialise {n}x{terms * g}x{num}x{num} attention logits ({needed / 2**30:.1f} "
            f"GiB) with {free / 2**30:.1f} GiB free on {q.device.type}: use impl='fused' (or 'auto'), the same "
            "function without the (HW)^2 matrix, or a smaller input / batch")


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on ``device`` (``None`` where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def syncs_batch_stats(*norms: nn.Module) -> bool:
    """Whether one of ``norms`` is a :class:`torch.nn.SyncBatchNorm` taking batch statistics (training; a
    frozen one, as in the detection backbone, takes its running statistics) over more than one process
    (``convert_sync_batchnorm`` under DDP): only the reference path, which calls the modules, gives those; the
    fused paths compute the logits' and outputs' BN moments of the local batch."""
    sync = [bn for bn in norms if isinstance(bn, nn.SyncBatchNorm) and uses_batch_stats(bn)]
    if not sync or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return any(torch.distributed.get_world_size(bn.process_group) > 1 for bn in sync)


def masked_norm(bn: nn.Module, x: Tensor, mask: KeyMask) -> Tensor:
    """``bn`` over an ``(N, C, H, W)`` map, batch statistics over the positions inside the images, of the local
    batch for a SyncBatchNorm too (a BN folded for inference is an ``nn.Identity``)."""
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return bn(x)
    return masked_batch_norm(bn, x, mask.inside().unsqueeze(1))


class BinaryAttention2d(nn.Module):
    """Multi-head all-to-all attention of the LESA / SA layers (see module docstring).

    Raises:
        ConfigError: an argument of the wrong type, out of range or not among its choices (one line naming it).
        InputError: (forward) an input that is not ``(N, in_channels, H, W)`` of the parameters' dtype and device.
    """

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
        self.ablate_unary = False  # Table 1: drop each query's own term (eval only; see lesa.analysis)
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
        taking batch statistics across processes (:func:`syncs_batch_stats`), because the fused paths' BN
        moments are those of the local batch. (A padded batch's BN moments are the local batch's on every
        path: they are taken over what lies inside the images.)"""
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
               stacked: bool = True) -> Tensor:
        """``(N, G, HW, dv)`` attention outputs -> ``bn_out`` -> ``(N, C, H, W)``. ``stacked``: the official
        computation, ``bn_out`` over the interleaved stacked halves (the reference path; TorchScript and torch.fx
        graphs); else :func:`~lesa.layers.bn_moments.interleaved_batch_norm`, the same function without the
        stacked copy (the fused paths)."""
        n = values.shape[0]
        if not torch.jit.is_scripting():
            if self.folded:
                return self.finish_folded(values, value_embed, height, width)
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
        :func:`batch_padding` where one is open, else no padding."""
        check_input(x, self.in_channels, "BinaryAttention2d", self.qkv.weight)
        if torch.jit.is_scripting():
            torch._assert(valid_size is None, "padding masks run in eager mode and under torch.compile / export")
            return self.forward_reference(x)
        if graph_mode(x) == "symbolic":
            if valid_size is not None or _BATCH_PADDING.get() is not None:
                raise InputError("padding masks run in eager mode and under torch.compile / torch.export, not in "
                                 "torch.fx or torch.jit.trace graphs: run the padded batch without tracing")
            return self.forward_reference(x)
        height, width = x.shape[-2:]
        self.rel_pos.check_size(height, width)
        mask = self.key_mask(x, valid_size)
        if mask is not None:
            return self.forward_masked(x, mask)
        q, k, v = self.project_qkv(x)
        impl = self.resolve_impl(height, width)
        if impl == "reference":
            check_reference_memory(q, 3 if self.pos_embed == "flat" else 2)
            values, value_embed = self.attend_reference(q, k, v, height, width)
        else:
            values, value_embed = self.attend_fused(q, k, v, height, width, dense=impl == "dense")
        if self.ablate_unary:
            values, value_embed = self.remove_self_term(q, k, v, values, value_embed, height, width)
        return self.finish(values, value_embed, height, width, stacked=impl == "reference")

    def forward_masked(self, x: Tensor, mask: KeyMask) -> Tensor:
        """:meth:`forward` of a padded 'rel2d' batch: keys outside the images masked, BatchNorm statistics over
        what lies inside (see the module docstring)."""
        height, width = x.shape[-2:]
        q, k, v = self.split_qkv(masked_norm(self.bn_qkv, self.qkv(x), mask))
        if self.resolve_impl(height, width, masked=True) == "reference":
            check_reference_memory(q, 2)
            values = softmax_f32(self.masked_reference_logits(q, k, height, width, mask)).to(v.dtype) @ v
        else:
            values, _ = self.attend_fused(q, k, v, height, width, mask=mask)
        if self.ablate_unary:
            values, _ = self.remove_self_term(q, k, v, values, None, height, width, mask)
        if self.folded:
            return self.finish_folded(values, None, height, width)
        out = values.transpose(-1, -2).reshape(x.shape[0], self.out_channels, height, width)
        return masked_norm(self.bn_out, out, mask)

    def key_mask(self, x: Tensor, valid_size: Optional[Tensor]) -> Optional[KeyMask]:
        """The padding of ``x`` from ``valid_size`` or the open :func:`batch_padding`; ``None`` without either.

        Raises:
            ConfigError: a mask for a 'flat' layer (its tables fix the map size: nothing is padded).
            InputError: a ``valid_size`` that is not an ``(N, 2)`` integer tensor.
        """
        height, width = x.shape[-2:]
        if valid_size is None:
            valid_size = padding_valid_size(x)
            if valid_size is None:
                return None
        else:
            valid_size = check_valid_size(valid_size, x)
        if self.pos_embed == "flat":
            raise ConfigError("pos_embed='flat' takes no padding mask (its tables fix one map size): build the "
                              "model with pos_embed='rel2d' for padded batches, as the detection backbones are")
        return KeyMask.from_valid_size(valid_size, height, width)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The reference path alone, as TorchScript and torch.fx take it (the input is already checked)."""
        height, width = x.shape[-2], x.shape[-1]
        self.rel_pos.assert_size(height, width)
        q, k, v = self.project_qkv(x)
        values, value_embed = self.attend_reference(q, k, v, height, width)
        return self.finish(values, value_embed, height, width)

    # -- reference: materialised logits ---------------------------------------------------------------
    def reference_logits(self, q: Tensor, k: Tensor, height: int, width: int) -> Tensor:
        """The summed, BN-normalised ``(N, G, HW, HW)`` logits, exactly as the official code forms them."""
        n, g, num = q.shape[0], q.shape[1], q.shape[2]
        terms = [q @ k.transpose(-1, -2)] + self.rel_pos.reference_logits(q, k, height, width)
        stacked = self.bn_logits(torch.cat(terms, dim=1))
        return stacked.view(n, len(terms), g, num, num).sum(1)

    def masked_reference_logits(self, q: Tensor, k: Tensor, height: int, width: int, mask: KeyMask) -> Tensor:
        """:meth:`reference_logits` of a padded batch: BN statistics over the pairs inside the images, ``-inf``
        for the padded keys."""
        n, g, num = q.shape[0], q.shape[1], q.shape[2]
        terms = [q @ k.transpose(-1, -2)] + self.rel_pos.reference_logits(q, k, height, width)
        inside = mask.positions()
        pairs = (inside.unsqueeze(-1) & inside.unsqueeze(-2)).unsqueeze(1)  # (N, 1, HW, HW)
        stacked = masked_batch_norm(self.bn_logits, torch.cat(terms, dim=1), pairs)
        logits = stacked.view(n, len(terms), g, num, num).sum(1)
        return logits.masked_fill(~inside[:, None, None, :], float("-inf"))

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, height: int,
                         width: int) -> tuple[Tensor, Optional[Tensor]]:
        attn = softmax_f32(self.reference_logits(q, k, height, width)).to(v.dtype)
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

    # -- looking inside: attention rows without the (HW)^2 matrix ---------------------------------------
    def logit_rows(self, q: Tensor, k: Tensor, height: int, width: int,
                   mask: Optional[KeyMask] = None) -> Callable[[int, int], Tensor]:
        """``rows(start, stop)``: the BN-normalised logits ``(N, G, stop - start, HW)`` of those queries,
        equal to rows of :meth:`reference_logits` (padded keys: ``MASKED_LOGIT`` instead of ``-inf``). Use in
        eval mode (training would update the BN)."""
        ops = self.fused_operands(q, k, height, width, mask)
        if self.pos_embed != "flat":
            q_aug, k_aug = augment_rel2d(ops["q"], ops["k"], ops["rows"], ops["cols"])
            return lambda start, stop: q_aug[:, :, start:stop] @ k_aug.transpose(-1, -2)
        num = q.shape[-2]

        def rows(start: int, stop: int) -> Tensor:
            wq, wk = flat_windows(start, stop - start, num)
            return flat_block_logits(ops["q_k"][:, :, start:stop], ops["q_r"][:, :, start:stop], k, ops["k_r"],
                                     ops["tq"][:, wq], ops["tk"][:, wk], ops["shift"])[0]

        return rows

    def _eval_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.training:
            raise RuntimeError("attention analysis runs in eval mode (call model.eval()): in training mode it "
                               "would update the BatchNorm statistics")
        check_input(x, self.in_channels, type(self).__name__, self.qkv.weight)
        self.rel_pos.check_size(*x.shape[-2:])
        return self.project_qkv(x)

    @torch.no_grad()
    def attention_diagonal(self, x: Tensor) -> Tensor:
        """``p_ii``, the softmax weight each query gives itself (Eq. 2-3), ``(N, heads, H*W)``."""
        q, k, _ = self._eval_qkv(x)
        return softmax_diagonal(self.logit_rows(q, k, *x.shape[-2:]), q.shape[-2], self.query_block(q))

    @torch.no_grad()
    def attention_map(self, x: Tensor, query: int) -> Tensor:
        """The attention weights of one query (raster index) over all keys, ``(N, heads, H*W)``."""
        q, k, _ = self._eval_qkv(x)
        logits = self.logit_rows(q, k, *x.shape[-2:])(query, query + 1)
        return softmax_f32(logits)[:, :, 0]

    def remove_self_term(self, q: Tensor, k: Tensor, v: Tensor, values: Tensor, value_embed: Optional[Tensor],
                         height: int, width: int, mask: Optional[KeyMask] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Table 1's ablation: drop each query's own term ``p_ii v_i`` (and ``p_ii r_v[0]``) from the sums."""
        if self.training:
            raise RuntimeError("the unary ablation is an evaluation-time analysis; call model.eval()")
        if self.folded:
            raise ConfigError("the unary ablation needs the unfused model (its v carries bn_out's shift): "
                              "run it on a model not passed through fuse_for_inference")
        own = softmax_diagonal(self.logit_rows(q, k, height, width, mask), q.shape[-2], self.query_block(q))
        own = own.unsqueeze(-1).to(values.dtype)
        values = values - own * v
        if value_embed is not None:
            _, _, tv = self.rel_pos.tables()
            value_embed = value_embed - own * tv[:, q.shape[-2] - 1].to(values.dtype)
        return values, value_embed

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, heads={self.heads}, "
            f"pos_embed={self.pos_embed!r}, impl={self.impl!r}"
        )


def softmax_diagonal(rows: Callable[[int, int], Tensor], num: int, block: int) -> Tensor:
    """``p_ii`` of a softmax over ``num`` keys whose logit rows ``rows(start, stop)`` come in blocks."""
    parts = []
    for start in range(0, num, block):
        logits = rows(start, min(num, start + block))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        own = logits.diagonal(offset=start, dim1=-2, dim2=-1)
        parts.append(torch.exp(own - logits.logsumexp(-1)))
    return torch.cat(parts, dim=-1)


@contextlib.contextmanager
def ablate_unary(model: nn.Module) -> Iterator[nn.Module]:
    """Table 1's unary ablation: within the block, every attention layer of ``model`` (in eval mode)
    drops each query's own term.

    Eq. 2 splits self-attention into ``S_ii v_i`` (the unary term) and ``sum_{j != i} S_ij v_j``; the
    binary term here drops ``S_ii v_i`` (and, with the 'flat' embedding, the value embedding's own term
    ``S_ii r_v[0]``) before its output BatchNorm, and nothing else changes. For an SA model this is
    "SA - unary term"; in a LESA model it removes the diagonal of the binary term (not the
    convolutional unary term).
    """
    layers = [m for m in model.modules() if isinstance(m, BinaryAttention2d)]
    if not layers:
        raise ConfigError("the model has no attention layers (SA / LESA) whose unary term could be removed")
    for layer in layers:
        layer.ablate_unary = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.ablate_unary = False
