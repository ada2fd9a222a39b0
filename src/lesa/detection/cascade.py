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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from .roi_align import CascadeRoIAlign, RoIMaps

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


def build_cascade_heads(num_classes: int, *, htc: bool, masks: bool = True, semantic_classes: Optional[int] = None,
                        out_channels: int = 256, num_levels: int = 5, **kwargs) -> CascadeRoIHeads:
    """Cascade Mask R-CNN's RoI heads, Cascade R-CNN's (``masks=False``), or HTC's (``htc=True``;
    ``semantic_classes`` adds the branch)."""
    levels = ["0", "1", "2", "3"]  # torchvision's Mask R-CNN pools: the FPN's levels, not its max-pooled fifth
    box_pool = CascadeRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=2)
    mask_pool = CascadeRoIAlign(featmap_names=levels, output_size=14, sampling_ratio=2) if masks else None
    stages = len(kwargs.get("stage_ious", STAGE_IOUS))
    box_heads = [CascadeBoxHead(out_channels, box_pool.output_size[0], num_classes) for _ in range(stages)]
    mask_heads = [CascadeMaskHead(out_channels, num_classes, info_flow=htc and i > 0)
                  for i in range(stages)] if masks else None
    semantic = FusedSemanticHead(num_levels, out_channels, semantic_classes) if semantic_classes else None
    return CascadeRoIHeads(box_heads, mask_heads, box_roi_pool=box_pool, mask_roi_pool=mask_pool,
                           semantic_head=semantic, interleaved=htc, mask_info_flow=htc, **kwargs)


__all__ = ["CascadeBoxHead", "CascadeMaskHead", "CascadeRoIHeads", "FusedSemanticHead", "build_cascade_heads"]
