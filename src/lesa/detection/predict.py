"""A detector and its predictions: the model a config describes (:func:`detector_of`, for training and
inference alike), the model of a trained run (:func:`load_detector`) and drawings of its boxes, labels, scores
and masks on images (:func:`predict_images`, ``lesa det predict``: an input it cannot read, a folder too, is
named on stderr and skipped, the others are done).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data.coco import (
    semantic_class_count,
)
from ..engine import (
    load_checkpoint,
    resolve_device,
)
from ..errors import BadImageError, LesaError, NotFoundError
from ..ownership import claim
from ..utils import atomic_write
from .config import DetConfig
from .detectors import build_detector
from .visualize import draw_prediction, load_image


def detector_of(cfg: DetConfig, classes: list[str]) -> nn.Module:
    """The detector a run's configuration describes, for ``classes`` (background added)."""
    semantic_classes = None
    if cfg.with_semantic:
        semantic_classes = semantic_class_count(cfg.semantic_source("train"), len(classes), cfg.semantic_classes)
    return build_detector(
        cfg.detector, cfg.backbone, len(classes) + 1, pretrained_backbone=cfg.pretrained_backbone,
        trainable_layers=cfg.trainable_layers, frozen_bn=cfg.frozen_bn, dcn_stages=cfg.dcn_stages,
        deform_unary=cfg.deform_unary, pos_init=cfg.pos_init, checkpoint=cfg.checkpoint_layers, impl=cfg.impl,
        min_size=cfg.min_size, max_size=cfg.max_size, train_scales=cfg.train_scales,
        semantic_classes=semantic_classes, box_batch_size_per_image=cfg.box_batch_size_per_image,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
    )


def load_detector(checkpoint: str | Path) -> tuple[nn.Module, DetConfig, dict[str, Any]]:
    """A trained detector from a run directory (``best.pt``) or checkpoint, with its config and state (whose
    ``categories`` is the run's mapping)."""
    state = load_checkpoint(checkpoint, kind="detection")
    saved = {k: v for k, v in state["config"].items() if k in DetConfig.__dataclass_fields__}
    cfg = DetConfig(**{**saved, "pretrained_backbone": None, "resume": False, "device": "auto"})
    model = detector_of(cfg, state["classes"])
    model.load_state_dict(state["model"])
    if "categories" not in state:  # a run saved before the mapping was stored has its two halves
        state["categories"] = [dict(id=i, name=n) for i, n in zip(state["category_ids"], state["classes"])]
    return model.eval(), cfg, state


def predict_images(checkpoint: str | Path, images: list[str], output: str | Path, score_threshold: float = 0.5,
                   device: str = "auto", on_bad_image: Optional[Callable[[LesaError], None]] = None,
                   ) -> Iterator[tuple[str, int, Path]]:
    """Draw a detector's boxes, labels (the run's names), scores and masks on each image; yields (image,
    detections kept, PNG written). Detections below ``score_threshold`` are dropped before their masks are
    pasted at full resolution, so memory follows what is kept, not the image size.

    An input that cannot be read (:class:`BadImageError`: undecodable, or over the reader's pixel limit;
    :class:`NotFoundError`) goes to ``on_bad_image`` and is skipped, the others are done; without
    ``on_bad_image`` it is raised.
    """
    dev = resolve_device(device)
    model, _, state = load_detector(checkpoint)
    model.to(dev)
    model.roi_heads.score_thresh = max(model.roi_heads.score_thresh, score_threshold)
    out = Path(output)
    claim(out, "predictions")
    for path, name in zip(images, output_names(images)):
        try:
            image = load_image(path)
        except (BadImageError, NotFoundError) as err:
            if on_bad_image is None:
                raise
            on_bad_image(err)
            continue
        with torch.no_grad():
            prediction = {k: v.cpu() for k, v in model([image.to(dev)])[0].items()}
        target = out / name
        drawing = draw_prediction(image, prediction, state["classes"], score_threshold)
        atomic_write(target, lambda tmp, drawing=drawing: drawing.save(tmp, format="PNG"))
        yield path, int((prediction["scores"] >= score_threshold).sum()), target


def output_names(images: list[str]) -> list[str]:
    """``<stem>.png`` for each input, with the parent folders' names added where stems collide
    (``a/x.jpg`` and ``b/x.png`` -> ``a_x.png``, ``b_x.png``; the same path twice -> ``x.png``, ``x_2.png``)."""
    stems = [Path(p).stem for p in images]
    names = []
    for path, stem in zip(images, stems):
        parent = Path(path).resolve().parent.name
        names.append(f"{parent}_{stem}" if stems.count(stem) > 1 else stem)
    unique: list[str] = []
    for name in names:
        candidate, k = f"{name}.png", 1
        while candidate in unique:
            k += 1
            candidate = f"{name}_{k}.png"
        unique.append(candidate)
    return unique
