"""Mask R-CNN with a LESA-FPN backbone on torchvision (the paper's Tables 3-4 setting)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from torchvision.models.detection import MaskRCNN

from ..engine import run_kind
from ..errors import CheckpointError, ConfigError
from ..layers.rel_pos import resize_rel_table
from ..weights import model_state_dict, read_checkpoint
from .backbone import LesaFPNBackbone, build_backbone

POS_INIT = ("reinit", "interpolate")


def build_maskrcnn(
    backbone_name: str,
    num_classes: int,
    pretrained_backbone: Optional[str | Path] = None,
    dcn_stages: Sequence[int] = (),
    deform_unary: bool = False,
    trainable_layers: int = 3,
    min_size: int = 800,
    max_size: int = 1333,
    pos_init: str = "reinit",
    frozen_bn: bool = True,
    checkpoint: bool = False,
    impl: str = "auto",
    table_size: Optional[int] = None,
    **kwargs: Any,
) -> MaskRCNN:
    """A torchvision :class:`~torchvision.models.detection.MaskRCNN` over a lesa backbone.

    Args:
        backbone_name: any lesa model name (``lesa_resnet50``, ``resnet50``, ``sa_wide_resnet50_2``, ...).
        num_classes: object classes *including* the background (torchvision's convention).
        pretrained_backbone: a classification checkpoint of the same backbone (a lesa run directory or
            file, or an official one: it is converted). The classifier is dropped; everything whose name and
            shape fit is loaded; position tables are re-initialised (``pos_init='reinit'``, as the authors'
            detection code) or interpolated to the lengths this backbone uses (``'interpolate'``, 'rel2d'
            tables only). What was not loaded is reported in ``model.backbone_init``.
        dcn_stages: stages whose 3x3 convolutions are deformable (the paper's "Dconv." uses 2-4; with a LESA
            backbone, stages 3-4 are LESA and only stage 2 has convolutions to deform).
        deform_unary: LESA's unary term deformable (one offset group), the paper's 20-epoch rows.
        trainable_layers, frozen_bn: see :class:`~lesa.detection.backbone.LesaFPNBackbone`.
        min_size, max_size: torchvision's aspect-preserving resize.
        checkpoint: gradient checkpointing of the LESA terms (the official configs enable it).
        table_size: input size the position tables are built for (default ``max_size``).
        kwargs: passed to ``MaskRCNN`` (e.g. ``box_detections_per_img``, ``rpn_batch_size_per_image``).
    """
    if pos_init not in POS_INIT:
        raise ConfigError(f"pos_init={pos_init!r}: choose one of {POS_INIT}")
    backbone = build_backbone(backbone_name, dcn_stages, deform_unary, trainable_layers, frozen_bn,
                              table_size or max_size, checkpoint, impl)
    report = None
    if pretrained_backbone:
        report = load_backbone_weights(backbone, pretrained_backbone, pos_init)
    model = MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)
    model.backbone_init = report
    return model


def load_backbone_weights(backbone: LesaFPNBackbone, source: str | Path, pos_init: str = "reinit"
                          ) -> dict[str, list[str]]:
    """Initialise ``backbone.body`` from a classification checkpoint; return what was skipped and why."""
    state = read_checkpoint(source)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and run_kind(state) == "detection":
        raise CheckpointError(f"{source} is a detection run: --pretrained-backbone takes a classification checkpoint "
                              "(a lesa run or weights file, or the authors' converted one)")
    sd = model_state_dict(state)
    body = backbone.body
    own = body.state_dict()
    tables = [k for k in sd if ".rel_pos." in k]
    if pos_init == "interpolate":
        flat = [k for k in tables if k.endswith("rel_pos.relative")]
        if flat:
            raise ConfigError(f"pos_init='interpolate' needs 'rel2d' tables; the checkpoint has 'flat' ones "
                             f"({flat[0]}, ...): use pos_init='reinit'")
        # Each table to the length this backbone's layer uses: the detection layout runs stage 4 at stride
        # 32 where classification runs it at 16, so one image-size ratio would not fit every layer.
        sd = {k: resize_rel_table(v, (own[k].shape[0] + 1) // 2).clone() if k in tables and k in own else v
              for k, v in sd.items()}
    skipped: dict[str, list[str]] = {"classifier": [], "position tables (re-initialised)": [],
                                     "shape mismatch": [], "not in the backbone": []}
    loadable = {}
    for key, value in sd.items():
        if key.startswith("fc."):
            skipped["classifier"].append(key)
        elif ".rel_pos." in key and pos_init == "reinit":
            skipped["position tables (re-initialised)"].append(key)
        elif key not in own:
            skipped["not in the backbone"].append(key)
        elif own[key].shape != value.shape:
            skipped["shape mismatch"].append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        elif own[key].is_floating_point() != value.is_floating_point():
            raise CheckpointError(f"{source}: {key} is stored as {value.dtype} where the backbone has "
                                  f"{own[key].dtype}; re-export the weights as float")
        else:
            loadable[key] = value
    if not loadable:
        raise CheckpointError(f"no weights of {source} fit the {type(body).__name__} backbone (its keys: "
                              f"{', '.join(list(sd)[:3])}, ...): pass a classification checkpoint of the same model")
    body.load_state_dict(loadable, strict=False)
    skipped["newly initialised"] = sorted(k for k in own if k not in loadable)
    return {k: v for k, v in skipped.items() if v}


def describe_init(report: Optional[dict[str, list[str]]]) -> str:
    if not report:
        return "backbone: random initialisation"
    parts = [f"{len(keys)} {what}" for what, keys in report.items()]
    return "backbone initialised from the checkpoint; skipped: " + ", ".join(parts)
