"""Cascade R-CNN, Cascade Mask R-CNN and Hybrid Task Cascade (HTC) on torchvision's detection parts.

Cascade R-CNN (Cai & Vasconcelos, CVPR 2018) refines boxes in 3 stages whose heads are trained at rising
IoU thresholds (0.5 / 0.6 / 0.7) on the boxes the previous stage regressed; each stage has a 2-FC (1024)
box head with class-agnostic regression, its own regression target scale ((0.1, 0.1, 0.2, 0.2), then
halved, then thirded) and loss weight (1, 0.5, 0.25), and a mask head. At test time the class logits of
the three stages are averaged, the boxes come from the last stage, and the masks of the three heads are
averaged after their sigmoids. Without mask heads the same cascade is Cascade R-CNN (boxes only).

HTC (Chen et al., "Hybrid Task Cascade for Instance Segmentation", CVPR 2019, arXiv 1901.07518) changes
three things, each a flag here: *interleaved* execution (each stage's mask head trains on the boxes its
own box head has just refined, re-assigned and re-sampled, not on the stage's input boxes), *mask
information flow* (each mask head adds the previous head's features through a 1x1 convolution, so the
stage-3 mask sees what stages 1-2 computed), and the optional *semantic branch*: a fully convolutional
head over the FPN levels fused at stride 8, trained with per-pixel cross-entropy (weight 0.2, label 255
ignored), whose features are added to every box and mask RoI feature.

The detectors are torchvision ``GeneralizedRCNN`` models (``model(images, targets)`` -> losses in
training, one dict of ``boxes``, ``labels``, ``scores``, ``masks`` per image in evaluation) built from its
``RegionProposalNetwork``, ``MultiScaleRoIAlign``, ``BoxCoder``, ``Matcher``,
``BalancedPositiveNegativeSampler`` and ``GeneralizedRCNNTransform``; only the cascade RoI heads are ours.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from ..errors import InputError
from .backbone import mark_image_sizes

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_WEIGHTS = (1.0, 0.5, 0.25)
# Regression target standard deviations per stage (mmdetection's); the box coder's weights are their inverses.
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
IGNORE_LABEL = 255


class CascadeBoxHead(nn.Module):
    """Two shared 1024-d FCs, then class logits (``num_classes`` with background) and one class-agnostic box."""

    def __init__(self, in_channels: int, resolution: int, num_classes: int, hidden: int = 1024) -> None:
        super().__init__()
        self.fcs = TwoMLPHead(in_channels * resolution**2, hidden)
        self.cls_score = nn.Linear(hidden, num_classes)
        self.bbox_pred = nn.Linear(hidden, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.fcs(x)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeMaskHead(nn.Module):
    """Four 3x3 convolutions, a 2x deconvolution and per-class logits (28x28 from 14x14 RoIs).

    With ``info_flow`` the previous stage's features (after its convolutions) pass through a 1x1
    convolution and are added to the RoI features first (HTC's mask information flow). ``forward``
    returns the logits and these features for the next stage.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 4,
                 info_flow: bool = False) -> None:
        super().__init__()
        self.conv_res = nn.Conv2d(channels, channels, 1) if info_flow else None
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, previous: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        x = self.features(x, previous)
        return self.logits(F.relu(self.upsample(x))), x

    def features(self, x: Tensor, previous: Optional[Tensor] = None) -> Tensor:
        """The features after the convolutions (what the next stage's information flow takes), without the
        logits: in training the earlier heads of the flow are run for these alone."""
        if self.conv_res is not None and previous is not None:
            x = x + self.conv_res(previous)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


class FusedSemanticHead(nn.Module):
    """HTC's semantic branch: 1x1 lateral convolutions on every FPN level, all resized to the level of
    stride 8 and summed, four 3x3 convolutions, then per-pixel class logits and a 1x1 embedding whose
    features are added to the RoI features of the box and mask heads."""

    def __init__(self, num_levels: int, in_channels: int, num_classes: int, channels: int = 256,
                 num_convs: int = 4, fusion_level: int = 1, loss_weight: float = 0.2) -> None:
        super().__init__()
        self.fusion_level, self.loss_weight = fusion_level, loss_weight
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels, channels, 1) for _ in range(num_levels))
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs))
        self.embedding = nn.Conv2d(channels, channels, 1)
        self.logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        x = F.relu(self.lateral[self.fusion_level](features[self.fusion_level]))
        size = x.shape[-2:]
        for i, feature in enumerate(features):
            if i != self.fusion_level:
                lateral = F.relu(self.lateral[i](feature))
                x = x + F.interpolate(lateral, size=size, mode="bilinear", align_corners=True)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.logits(x), F.relu(self.embedding(x))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy against ``labels`` (N, H, W) at image resolution, taken at the logits' stride
        (nearest), pixels labelled 255 ignored."""
        small = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        if not (small != IGNORE_LABEL).any():
            return logits.sum() * 0.0
        return self.loss_weight * F.cross_entropy(logits, small, ignore_index=IGNORE_LABEL)


# -- RoIAlign as one sparse product ------------------------------------------------------------------------
# torchvision's CPU ``roi_align`` runs on one thread and its backward recomputes every sample's bilinear
# weights for every channel (measured 2026-12-01: 28 % of an HTC training step, 7.8 s of it for the semantic
# map pooled at 14x14 on 512 box RoIs per stage). RoIAlign is linear in the feature map: each output bin is a
# weighted sum of at most ``4 * sampling_ratio**2`` positions, with weights that depend on the RoI alone. On
# the CPU the heads therefore lay the maps out once per forward as one (positions, channels) matrix, build each
# bin's positions and weights with torchvision's rules (:func:`roi_align_entries`), and take the sums with
# ``embedding_bag``; the backward is the transposed product, again one ``embedding_bag``. The values are
# torchvision's up to float rounding (tests/test_cascade.py compares both in float64). On other devices
# torchvision's kernels are used.


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


@dataclass
class Sample:
    """One stage's training RoIs of one image: boxes, class labels (0 = background), the ground truth
    each is matched to, whether it is a ground-truth box, and its regression targets."""

    rois: Tensor
    labels: Tensor
    matched: Tensor
    is_gt: Tensor
    targets: Tensor


class CascadeRoIHeads(nn.Module):
    """Cascade RoI heads: Cascade R-CNN (no ``mask_heads``), Cascade Mask R-CNN, or HTC with ``interleaved``,
    ``mask_info_flow`` and a ``semantic_head`` (see the module docstring). Called as torchvision's ``RoIHeads``."""

    def __init__(self, box_heads: Sequence[CascadeBoxHead], mask_heads: Optional[Sequence[CascadeMaskHead]], *,
                 box_roi_pool: CascadeRoIAlign, mask_roi_pool: Optional[CascadeRoIAlign],
                 semantic_head: Optional[FusedSemanticHead] = None, interleaved: bool = False,
                 mask_info_flow: bool = False, stage_ious: Sequence[float] = STAGE_IOUS,
                 stage_weights: Sequence[float] = STAGE_WEIGHTS,
                 stage_stds: Sequence[Sequence[float]] = STAGE_STDS, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100) -> None:
        super().__init__()
        heads = len(box_heads)
        if not heads == len(mask_heads or box_heads) == len(stage_ious) == len(stage_weights) == len(stage_stds):
            raise ValueError("one box head, mask head (if any), IoU threshold, loss weight and std per stage")
        if (interleaved or mask_info_flow) and not mask_heads:
            raise ValueError("interleaved execution and mask information flow need mask heads (HTC)")
        self.box_heads = nn.ModuleList(box_heads)
        self.mask_heads = nn.ModuleList(mask_heads) if mask_heads else None
        self.box_roi_pool, self.mask_roi_pool = box_roi_pool, mask_roi_pool
        self.semantic_head = semantic_head
        self.interleaved, self.mask_info_flow = interleaved, mask_info_flow
        self.stage_weights = tuple(stage_weights)
        self.matchers = [Matcher(iou, iou, allow_low_quality_matches=False) for iou in stage_ious]
        self.box_coders = [BoxCoder(tuple(1.0 / s for s in stds)) for stds in stage_stds]
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    @property
    def has_masks(self) -> bool:
        return self.mask_heads is not None

    # -- features -------------------------------------------------------------------------------------
    def semantic_features(self, features: dict[str, Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if self.semantic_head is None:
            return None, None
        return self.semantic_head(list(features.values()))

    def box_forward(self, stage: int, maps: RoIMaps, rois: list[Tensor],
                    image_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """The stage's class logits and box deltas on ``rois``: their FPN features (7x7) plus, with the semantic
        branch, its features pooled at 14x14 and averaged to 7x7 (:class:`CascadeRoIAlign`)."""
        return self.box_heads[stage](self.box_roi_pool(maps, rois, image_shapes))

    def mask_logits(self, stage: int, features: dict[str, Tensor] | RoIMaps, rois: list[Tensor],
                    image_shapes: list[tuple[int, int]], semantic: Optional[Tensor] = None) -> list[Tensor]:
        """The mask logits of stages ``0..stage`` on ``rois`` (with information flow, each stage's head
        receives the previous one's features). ``features``: the FPN levels, or the forward's :class:`RoIMaps`
        (which carry the semantic features)."""
        maps = features if isinstance(features, RoIMaps) else RoIMaps(features, semantic)
        x = self.mask_roi_pool(maps, rois, image_shapes)
        logits, previous = [], None
        for head in self.mask_heads[: stage + 1]:
            out, feat = head(x, previous if self.mask_info_flow else None)
            logits.append(out)
            previous = feat
        return logits

    def mask_train_logits(self, stage: int, maps: RoIMaps, rois: list[Tensor],
                          image_shapes: list[tuple[int, int]]) -> Tensor:
        """The stage's mask logits in training. With information flow the earlier heads run on these RoIs for
        their features alone (HTC recomputes them on every stage's RoIs); without it they are not run."""
        x = self.mask_roi_pool(maps, rois, image_shapes)
        previous = None
        if self.mask_info_flow:
            for head in self.mask_heads[:stage]:
                previous = head.features(x, previous)
        return self.mask_heads[stage](x, previous)[0]

    # -- training -------------------------------------------------------------------------------------
    def sample(self, stage: int, rois: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Sample]:
        """Add the ground truth to each image's RoIs, match at the stage's IoU and sample
        ``batch_size_per_image`` with the positive fraction."""
        samples, labels_all = [], []
        for boxes, target in zip(rois, targets):
            gt = target["boxes"].to(boxes.dtype)
            boxes = torch.cat([boxes, gt])
            is_gt = torch.cat([torch.zeros(len(boxes) - len(gt), dtype=torch.bool, device=boxes.device),
                               torch.ones(len(gt), dtype=torch.bool, device=boxes.device)])
            if len(gt) == 0:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            else:
                match = self.matchers[stage](box_iou(gt, boxes))
                matched = match.clamp(min=0)
                labels = target["labels"][matched].clone()
                labels[match == Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[match == Matcher.BETWEEN_THRESHOLDS] = -1
            samples.append((boxes, labels, matched, is_gt, gt))
            labels_all.append(labels)
        positive, negative = self.sampler(labels_all)
        out = []
        for (boxes, labels, matched, is_gt, gt), pos, neg in zip(samples, positive, negative):
            keep = torch.where(pos | neg)[0]
            gt_boxes = gt[matched[keep]] if len(gt) else torch.zeros_like(boxes[keep])
            regression = self.box_coders[stage].encode_single(gt_boxes, boxes[keep])
            out.append(Sample(boxes[keep], labels[keep], matched[keep], is_gt[keep], regression))
        return out

    def refine(self, stage: int, samples: list[Sample], box_deltas: Tensor,
               image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The stage's sampled RoIs moved by its regression, clipped, ground-truth RoIs left out: the
        next stage's proposals."""
        rois = [s.rois for s in samples]
        decoded = self.decode(stage, box_deltas, rois, image_shapes)
        return [boxes[~s.is_gt] for boxes, s in zip(decoded, samples)]

    def decode(self, stage: int, box_deltas: Tensor, rois: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        boxes = self.box_coders[stage].decode_single(box_deltas, torch.cat(rois))
        return [clip_boxes_to_image(b, shape) for b, shape in zip(boxes.split([len(r) for r in rois]), image_shapes)]

    def forward_train(self, maps: RoIMaps, proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                      targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        rois = [p.detach() for p in proposals]
        for stage, weight in enumerate(self.stage_weights):
            samples = self.sample(stage, rois, targets)
            logits, deltas = self.box_forward(stage, maps, [s.rois for s in samples], image_shapes)
            loss_cls, loss_box = cascade_box_loss(logits, deltas, samples)
            with torch.no_grad():
                rois = self.refine(stage, samples, deltas, image_shapes)
            # interleaved: the mask head learns on the boxes this stage's box head has just refined
            mask_samples = self.sample(stage, rois, targets) if self.interleaved else samples
            losses[f"s{stage}.loss_classifier"] = weight * loss_cls
            losses[f"s{stage}.loss_box_reg"] = weight * loss_box
            if not self.has_masks:
                continue
            losses[f"s{stage}.loss_mask"] = weight * self.mask_loss(stage, maps, mask_samples, image_shapes, targets)
        return losses

    def mask_loss(self, stage: int, maps: RoIMaps, samples: list[Sample], image_shapes: list[tuple[int, int]],
                  targets: list[dict[str, Tensor]]) -> Tensor:
        positive = [s.labels > 0 for s in samples]
        rois = [s.rois[p] for s, p in zip(samples, positive)]
        if sum(len(r) for r in rois) == 0:  # keep every parameter in the graph (DDP)
            return sum(p.sum() for p in self.mask_heads[stage].parameters()) * 0.0
        logits = self.mask_train_logits(stage, maps, rois, image_shapes)
        return maskrcnn_loss(logits, rois, [t["masks"] for t in targets], [t["labels"] for t in targets],
                             [s.matched[p] for s, p in zip(samples, positive)])

    # -- inference ------------------------------------------------------------------------------------
    def forward_test(self, maps: RoIMaps, proposals: list[Tensor],
                     image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        rois, stage_logits = proposals, []
        for stage in range(self.num_stages):
            logits, deltas = self.box_forward(stage, maps, rois, image_shapes)
            stage_logits.append(logits)
            if stage < self.num_stages - 1:
                rois = self.decode(stage, deltas, rois, image_shapes)
        boxes = self.decode(self.num_stages - 1, deltas, rois, image_shapes)
        scores = F.softmax(torch.stack(stage_logits).mean(0), -1)  # the stages' logits averaged
        results = self.postprocess(boxes, scores.split([len(r) for r in rois]), image_shapes)
        if not self.has_masks:
            return results
        detected = [r["boxes"] for r in results]
        if sum(len(b) for b in detected):
            probs = torch.stack([m.sigmoid() for m in self.mask_logits(self.num_stages - 1, maps, detected,
                                                                        image_shapes)]).mean(0)
            labels = torch.cat([r["labels"] for r in results])
            probs = probs[torch.arange(len(labels), device=labels.device), labels][:, None]
            for result, masks in zip(results, probs.split([len(b) for b in detected])):
                result["masks"] = masks
        else:
            for result in results:
                result["masks"] = torch.zeros((0, 1, 28, 28), device=result["boxes"].device)
        return results

    def postprocess(self, boxes: list[Tensor], scores: Sequence[Tensor],
                    image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per class: scores above ``score_thresh``, boxes of at least 1 px, NMS at ``nms_thresh``; the best
        ``detections_per_img`` per image. Boxes are class-agnostic, so each class shares its RoI's box."""
        results = []
        for image_boxes, image_scores in zip(boxes, scores):
            num_classes = image_scores.shape[1]
            labels = torch.arange(1, num_classes, device=image_scores.device).expand(len(image_boxes), -1)
            flat_boxes = image_boxes[:, None].expand(-1, num_classes - 1, 4).reshape(-1, 4)
            flat_scores, flat_labels = image_scores[:, 1:].reshape(-1), labels.reshape(-1)
            keep = torch.where(flat_scores > self.score_thresh)[0]
            keep = keep[remove_small_boxes(flat_boxes[keep], 1e-2)]
            keep = keep[batched_nms(flat_boxes[keep], flat_scores[keep], flat_labels[keep], self.nms_thresh)]
            keep = keep[: self.detections_per_img]
            results.append(dict(boxes=flat_boxes[keep], scores=flat_scores[keep], labels=flat_labels[keep]))
        return results

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: Optional[list[dict[str, Tensor]]] = None):
        semantic_logits, semantic = self.semantic_features(features)
        pooled = {*self.box_roi_pool.featmap_names, *(self.mask_roi_pool.featmap_names if self.has_masks else ())}
        maps = RoIMaps({k: v for k, v in features.items() if k in pooled}, semantic)
        if not self.training:
            return self.forward_test(maps, proposals, image_shapes), {}
        losses = self.forward_train(maps, proposals, image_shapes, targets)
        if self.semantic_head is not None:
            padded = [s * 4 for s in features[next(iter(features))].shape[-2:]]  # the first level has stride 4
            losses["loss_semantic"] = self.semantic_head.loss(semantic_logits, semantic_targets(targets, padded))
        return [], losses


def cascade_box_loss(logits: Tensor, deltas: Tensor, samples: list[Sample]) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the sampled RoIs; smooth-L1 (beta 1) on the positives' class-agnostic deltas,
    divided by the number of sampled RoIs (mmdetection's cascade heads)."""
    labels = torch.cat([s.labels for s in samples])
    targets = torch.cat([s.targets for s in samples])
    positive = labels > 0
    loss_cls = F.cross_entropy(logits, labels)
    loss_box = F.smooth_l1_loss(deltas[positive], targets[positive], beta=1.0, reduction="sum") / max(1, len(labels))
    return loss_cls, loss_box


def semantic_targets(targets: list[dict[str, Tensor]], size: Sequence[int]) -> Tensor:
    """The images' class maps padded (with the ignored label) to the batch's padded size."""
    out = torch.full((len(targets), *size), IGNORE_LABEL, dtype=torch.int64, device=targets[0]["boxes"].device)
    for i, target in enumerate(targets):
        if "semantic" not in target:
            raise ValueError("the semantic branch needs targets with 'semantic' (an (H, W) int64 class map)")
        semantic = target["semantic"]
        out[i, : semantic.shape[0], : semantic.shape[1]] = semantic
    return out


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's resize / normalise / batch transform, which also resizes the targets' ``semantic``
    maps (nearest), and can draw each training image's scale: ``train_scales`` is a list of
    ``(probability, low, high)``; a scale ``s`` drawn uniformly from a chosen range resizes the image so
    that its longer side is ``s`` (aspect kept)."""

    def __init__(self, min_size: int, max_size: int, image_mean: list[float], image_std: list[float],
                 train_scales: Optional[Sequence[Sequence[float]]] = None, **kwargs) -> None:
        super().__init__(min_size, max_size, image_mean, image_std, **kwargs)
        self.train_scales = [tuple(s) for s in train_scales or []]

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        """torchvision's transform; the padded batch also carries its images' sizes, for the backbone
        (:func:`~lesa.detection.backbone.mark_image_sizes`: LESA masks the padding)."""
        if not images:  # torchvision would fail with an IndexError deep in its batching
            raise InputError("a detector takes a list of one or more images (each a (3, H, W) tensor); got an empty "
                             "list: call it only when there are images")
        image_list, targets = super().forward(images, targets)
        mark_image_sizes(image_list)
        return image_list, targets

    def draw_scale(self) -> int:
        weights = [p for p, _, _ in self.train_scales]
        _, low, high = random.choices(self.train_scales, weights=weights)[0]
        return int(round(random.uniform(low, high)))

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        if self.training and self.train_scales:
            scale = self.draw_scale()
            sizes = self.min_size, self.max_size
            self.min_size, self.max_size = (scale,), scale  # the longer side becomes `scale`
            try:
                image, target = super().resize(image, target)
            finally:
                self.min_size, self.max_size = sizes
        else:
            image, target = super().resize(image, target)
        if target is not None and "semantic" in target:
            semantic = target["semantic"][None, None].float()
            target["semantic"] = F.interpolate(semantic, size=image.shape[-2:], mode="nearest")[0, 0].long()
        return image, target


def build_cascade_heads(num_classes: int, *, htc: bool, masks: bool = True, semantic_classes: Optional[int] = None,
                        out_channels: int = 256, num_levels: int = 5, **kwargs) -> CascadeRoIHeads:
    """Cascade Mask R-CNN's RoI heads, Cascade R-CNN's (``masks=False``), or HTC's (``htc=True``;
    ``semantic_classes`` adds the branch)."""
    box_pool = CascadeRoIAlign(["0", "1", "2", "3"], 7, 2)
    mask_pool = CascadeRoIAlign(["0", "1", "2", "3"], 14, 2) if masks else None
    stages = len(kwargs.get("stage_ious", STAGE_IOUS))
    box_heads = [CascadeBoxHead(out_channels, 7, num_classes) for _ in range(stages)]
    mask_heads = [CascadeMaskHead(out_channels, num_classes, info_flow=htc and i > 0)
                  for i in range(stages)] if masks else None
    semantic = FusedSemanticHead(num_levels, out_channels, semantic_classes) if semantic_classes else None
    return CascadeRoIHeads(box_heads, mask_heads, box_roi_pool=box_pool, mask_roi_pool=mask_pool,
                           semantic_head=semantic, interleaved=htc, mask_info_flow=htc, **kwargs)


__all__ = ["CascadeBoxHead", "CascadeMaskHead", "CascadeRoIHeads", "DetectionTransform", "FusedSemanticHead",
           "build_cascade_heads"]

