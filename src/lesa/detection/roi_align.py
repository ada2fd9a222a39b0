"""RoIAlign for the cascade heads, on the CPU as one sparse product (:class:`CascadeRoIAlign`, :class:`RoIMaps`).

torchvision's CPU ``roi_align`` runs on one thread and its backward recomputes every sample's bilinear weights
for every channel (measured 2026-12-01: 28 % of an HTC training step, 7.8 s of it for the semantic map pooled
at 14x14 on 512 box RoIs per stage). RoIAlign is linear in the feature map: each output bin is a weighted sum
of at most ``4 * sampling_ratio**2`` positions, with weights that depend on the RoI alone. On the CPU the heads
therefore lay the maps out once per forward as one (positions, channels) matrix, build each bin's positions
and weights with torchvision's rules (:func:`roi_align_entries`), and take the sums with ``embedding_bag``;
the backward is the transposed product, again one ``embedding_bag``. The values are torchvision's up to float
rounding (tests/test_cascade.py compares both in float64). On other devices torchvision's kernels are used.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def roi_align_entries(rois: Tensor, scale: Tensor | float, output_size: int, sampling_ratio: int, height: Tensor | int,
                      width: Tensor | int, offset: Tensor | int = 0) -> tuple[Tensor, Tensor]:
    """The positions and weights of torchvision's ``roi_align`` (``aligned=False``, fixed ``sampling_ratio``).

    ``rois`` is ``(K, 5)`` (batch index, x1, y1, x2, y2); ``scale``, ``height``, ``width`` and ``offset`` are
    numbers or ``(K,)`` tensors (each RoI's map). A map of ``B`` images is laid out as ``(B, height, width)``
    rows from ``offset`` on. Returns ``index`` and ``weight`` of shape ``(K * output_size**2, 4 *
    sampling_ratio**2)``: output bin ``(k, i, j)`` (row ``(k * output_size + i) * output_size + j``) is
    ``sum(weight[row, e] * matrix[index[row, e]])``. The sample points, the clamping at the border and the
    samples outside the map (weight 0) follow torchvision's CPU kernel (``roi_align_kernel.cpp``); the
    average over the ``sampling_ratio**2`` samples is folded into the weights.
    """
    dtype, device = rois.dtype, rois.device
    k = len(rois)
    scale, height, width, offset = (v[:, None, None] if isinstance(v, Tensor) else v
                                    for v in (scale, height, width, offset))
    start_w, start_h = rois[:, 1, None, None] * scale, rois[:, 2, None, None] * scale
    roi_w = torch.clamp(rois[:, 3, None, None] * scale - start_w, min=1.0)
    roi_h = torch.clamp(rois[:, 4, None, None] * scale - start_h, min=1.0)
    bin_h, bin_w = roi_h / output_size, roi_w / output_size
    cell = torch.arange(output_size, dtype=dtype, device=device)[None, :, None]
    grid = (torch.arange(sampling_ratio, dtype=dtype, device=device) + 0.5)[None, None, :]
    # (K, bin, sample) coordinates, in the kernel's order of operations
    y = start_h + cell * bin_h + grid * bin_h / sampling_ratio
    x = start_w + cell * bin_w + grid * bin_w / sampling_ratio

    def axis(v: Tensor, size: Tensor | int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        inside = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0)
        low = v.floor().long()  # v >= 0: the kernel's truncation
        last = low >= size - 1
        low = torch.where(last, size - 1, low)
        high = torch.where(last, low, low + 1)
        frac = torch.where(last, low.to(dtype), v) - low
        return inside, low, high, frac, 1.0 - frac

    in_y, y_low, y_high, ly, hy = axis(y, height)
    in_x, x_low, x_high, lx, hx = axis(x, width)

    def rows(t: Tensor) -> Tensor:  # (K, bin_y, sample_y) -> (K, bin_y, 1, sample_y, 1)
        return t[:, :, None, :, None]

    def cols(t: Tensor) -> Tensor:  # (K, bin_x, sample_x) -> (K, 1, bin_x, 1, sample_x)
        return t[:, None, :, None, :]

    base = rows(offset + rois[:, 0].long()[:, None, None] * (height * width))
    row_width = rows(width) if isinstance(width, Tensor) else width
    inside = rows(in_y) & cols(in_x)
    corners = ((y_low, x_low, hy, hx), (y_low, x_high, hy, lx), (y_high, x_low, ly, hx), (y_high, x_high, ly, lx))
    index = torch.stack([base + rows(yy) * row_width + cols(xx) for yy, xx, _, _ in corners], -1)
    weight = torch.stack([rows(wy) * cols(wx) for _, _, wy, wx in corners], -1)
    weight = torch.where(inside[..., None], weight, 0.0) / (sampling_ratio * sampling_ratio)
    index = torch.where(inside[..., None], index, 0)
    entries = 4 * sampling_ratio**2
    return index.reshape(k * output_size**2, entries), weight.reshape(k * output_size**2, entries)


class _SparseRows(torch.autograd.Function):
    """``out[r] = sum_e weight[r, e] * matrix[index[r, e]]`` (``embedding_bag``); its backward is the transposed
    product, a second ``embedding_bag`` over the entries sorted by position."""

    @staticmethod
    def forward(ctx, matrix: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.positions = matrix.shape[0]
        if index.shape[0] == 0:
            return matrix.new_zeros(0, matrix.shape[1])
        return F.embedding_bag(index, matrix, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, weight = ctx.saved_tensors
        flat = index.reshape(-1)
        order = torch.argsort(flat)
        offsets = F.pad(torch.bincount(flat, minlength=ctx.positions).cumsum(0), (1, 0))
        rows = torch.div(order, index.shape[1], rounding_mode="floor")
        grad_matrix = F.embedding_bag(rows, grad.contiguous(), offsets, per_sample_weights=weight.reshape(-1)[order],
                                      mode="sum", include_last_offset=True)
        return grad_matrix, None, None


class RoIMaps:
    """The maps one forward of the heads samples: the FPN levels and, for HTC, the semantic features.

    On the CPU they are laid out once (on first use) as one ``(positions, channels)`` matrix that every RoIAlign
    of the forward (box and mask, every stage) reads, each map as ``(B, H, W)`` rows from its offset.
    """

    SEMANTIC = "semantic"

    def __init__(self, features: dict[str, Tensor], semantic: Optional[Tensor] = None) -> None:
        self.features, self.semantic = features, semantic
        self._matrix: Optional[Tensor] = None
        self.offsets: dict[str, int] = {}

    @property
    def sparse(self) -> bool:
        """Whether RoIAlign runs as the sparse product (on the CPU)."""
        return next(iter(self.features.values())).device.type == "cpu"

    def maps(self) -> dict[str, Tensor]:
        return {**self.features, **({self.SEMANTIC: self.semantic} if self.semantic is not None else {})}

    def matrix(self) -> Tensor:
        if self._matrix is None:
            parts, offset = [], 0
            for name, m in self.maps().items():
                self.offsets[name] = offset
                offset += m.shape[0] * m.shape[2] * m.shape[3]
                parts.append(m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]))
            self._matrix = torch.cat(parts)
        return self._matrix


class CascadeRoIAlign(MultiScaleRoIAlign):
    """torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` (the same FPN level per RoI, the same
    sampling), plus, where the maps carry HTC's semantic features, their RoIAlign at ``semantic_size`` (14, as
    mmdetection's HTC) averaged down to ``output_size`` (its ``adaptive_avg_pool2d``). Averaging ``s x s`` bins
    of ``sampling_ratio**2`` samples each is exactly one bin of ``(s * sampling_ratio)**2`` samples, so the
    semantic term is taken at ``output_size`` directly. On the CPU both terms are one sparse product
    (:class:`RoIMaps`); called with a dict of features, it pools them alone."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, *,
                 semantic_size: int = 14, **kwargs) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio, **kwargs)
        if semantic_size % output_size:
            raise ValueError(f"semantic_size {semantic_size} must be a multiple of output_size {output_size}")
        self.semantic_size = semantic_size
        self.semantic_scale: Optional[float] = None

    def forward(self, x: dict[str, Tensor] | RoIMaps, boxes: list[Tensor], image_shapes: list[tuple[int, int]]
                ) -> Tensor:
        maps = x if isinstance(x, RoIMaps) else RoIMaps(x)
        x_filtered = _filter_input(maps.features, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(x_filtered, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        if maps.semantic is not None and self.semantic_scale is None:
            self.semantic_scale = _setup_scales([maps.semantic], image_shapes, self.canonical_scale,
                                                self.canonical_level)[0][0]
        size, ratio = self.output_size[0], self.sampling_ratio
        semantic_ratio = ratio * self.semantic_size // size
        if not maps.sparse:
            out = super().forward(maps.features, boxes, image_shapes)
            if maps.semantic is not None:
                out = out + roi_align(maps.semantic, _convert_to_roi_format(boxes), size, self.semantic_scale,
                                      semantic_ratio)
            return out
        matrix = maps.matrix()
        rois = _convert_to_roi_format(boxes)
        if len(x_filtered) == 1:
            level = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        else:
            level = self.map_levels(boxes)
        names = [n for n in maps.features if n in self.featmap_names]
        heights = torch.tensor([maps.features[n].shape[2] for n in names], device=rois.device)[level]
        widths = torch.tensor([maps.features[n].shape[3] for n in names], device=rois.device)[level]
        offsets = torch.tensor([maps.offsets[n] for n in names], device=rois.device)[level]
        scales = torch.tensor(self.scales, dtype=rois.dtype, device=rois.device)[level]
        index, weight = roi_align_entries(rois, scales, size, ratio, heights, widths, offsets)
        if maps.semantic is not None:
            sem_index, sem_weight = roi_align_entries(rois, self.semantic_scale, size, semantic_ratio,
                                                      maps.semantic.shape[2], maps.semantic.shape[3],
                                                      maps.offsets[RoIMaps.SEMANTIC])
            index, weight = torch.cat([index, sem_index], 1), torch.cat([weight, sem_weight], 1)
        out = _SparseRows.apply(matrix, index, weight.to(matrix.dtype))
        # (K, size, size, C) rows viewed as (K, C, size, size): channels-last, which the mask head's
        # convolutions take as is; the box head's flatten copies it into its channel-major order
        return out.reshape(len(rois), size, size, matrix.shape[1]).permute(0, 3, 1, 2)


__all__ = ["CascadeRoIAlign", "RoIMaps", "roi_align_entries"]
