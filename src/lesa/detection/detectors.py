"""The detectors over lesa backbones: Mask R-CNN (torchvision's), Cascade Mask R-CNN and HTC (ours, on
torchvision's parts), the paper's Tables 3-4 settings, and their box-only forms for data without masks:
Faster R-CNN (torchvision's) and Cascade R-CNN. One builder, :func:`build_detector`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import _default_anchorgen
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, ConfigError
from ..layers.binary import IMPLS
from ..layers.checks import check_bool, check_choice, check_int, check_ints, check_optional_int, describe
from ..layers.factory import takes_factory_kwargs
from ..layers.rel_pos import resize_rel_table
from ..models import list_models
from ..weights import read_weights
from .backbone import LesaFPNBackbone, build_backbone
from .cascade import build_cascade_heads
from .transform import DetectionTransform

DETECTORS = ("maskrcnn", "cascade_maskrcnn", "htc", "fasterrcnn", "cascade_rcnn")
# Each mask detector's box-only form (HTC's box part is Cascade R-CNN: interleaving and mask information flow
# act through the mask heads).
BOX_ONLY = {"maskrcnn": "fasterrcnn", "cascade_maskrcnn": "cascade_rcnn", "htc": "cascade_rcnn"}
POS_INIT = ("reinit", "interpolate")
TRAINABLE_LAYERS = (0, 5)  # backbone stages trained: none (0) to all (5, the stem counted)
DCN_STAGES = (1, 4)  # the stages whose 3x3 convolutions may be deformable


@takes_factory_kwargs
def build_detector(
    kind: str,
    backbone: str,
    num_classes: int,
    *,
    pretrained_backbone: Optional[str | Path] = None,
    trainable_layers: Optional[int] = None,
    frozen_bn: Optional[bool] = None,
    dcn_stages: Sequence[int] = (),
    deform_unary: bool = False,
    pos_init: str = "reinit",
    checkpoint: bool = False,
    impl: str = "auto",
    min_size: int = 800,
    max_size: int = 1333,
    train_scales: Optional[Sequence[Sequence[float]]] = None,
    table_size: Optional[int] = None,
    semantic_classes: Optional[int] = None,
    box_batch_size_per_image: int = 512,
    rpn_post_nms_top_n_train: int = 2000,
) -> GeneralizedRCNN:
    """A detector (``kind`` in ``'maskrcnn'``, ``'cascade_maskrcnn'``, ``'htc'``, or the box-only
    ``'fasterrcnn'``, ``'cascade_rcnn'``) over a lesa backbone with an FPN; torchvision's forward contract
    (``model(images, targets)`` -> losses in training, one dict of boxes, labels, scores and, for the mask
    detectors, masks per image in evaluation).

    Args:
        kind: the detector (:data:`BOX_ONLY` maps each mask detector to its box-only form).
        backbone: any lesa model name (``lesa_resnet50``, ``resnet50``, ``sa_wide_resnet50_2``, ...).
        num_classes: object classes *including* the background (torchvision's convention).
        pretrained_backbone: a classification checkpoint of the same backbone (a lesa run directory or
            file, or an official one: it is converted). The classifier is dropped; everything whose name and
            shape fit is loaded; position tables are re-initialised (``pos_init='reinit'``, as the authors'
            detection code) or interpolated (``'interpolate'``, 'rel2d' tables only). What was not loaded is
            reported in ``model.backbone_init``.
        trainable_layers: backbone stages trained (0-5); default 3 with pretrained weights (stem and stage 1
            frozen, as usual for detection), 5 (all) from scratch.
        frozen_bn: the backbone's BatchNorms frozen; default: with pretrained weights only.
        dcn_stages: stages whose 3x3 convolutions are deformable (the paper's "Dconv." uses 2-4; with a LESA
            backbone, stages 3-4 are LESA and only stage 2 has convolutions to deform).
        deform_unary: LESA's unary term deformable (one offset group), the paper's 20-epoch rows.
        checkpoint: gradient checkpointing of the LESA terms (the official configs enable it).
        impl: the attention layers' implementation.
        min_size, max_size: the aspect-preserving resize (shorter side, longer side at most).
        train_scales: multi-scale training, ``[(probability, low, high), ...]``: the longer side drawn from a
            range (see :class:`~lesa.detection.transform.DetectionTransform`).
        table_size: input size the position tables are built for (default ``max_size``).
        semantic_classes: HTC's semantic branch with this many classes (COCO-stuff: 183); ``None``: without.
        box_batch_size_per_image: RoIs sampled per image (per stage for the cascades).
        rpn_post_nms_top_n_train: proposals kept in training.
        device, dtype: torch.nn's factory arguments (keyword-only): every parameter and buffer created there
            and so, not copied afterwards.

    Raises:
        ConfigError: an argument of the wrong type, out of range or not among its choices (one line naming it;
            ``backbone`` a model name, not a module), a backbone that cannot be built as asked, or pretrained
            weights that do not fit.
    """
    check_choice("kind", kind, DETECTORS)
    check_backbone(backbone)
    check_choice("pos_init", pos_init, POS_INIT)
    check_choice("impl", impl, IMPLS)
    check_int("num_classes", num_classes, minimum=2, hint="the object classes plus 1 for the background")
    check_optional_int("trainable_layers", trainable_layers, *TRAINABLE_LAYERS, hint="backbone stages trained, 5: all")
    if frozen_bn is not None:
        check_bool("frozen_bn", frozen_bn)
    check_ints("dcn_stages", dcn_stages, *DCN_STAGES, hint="the backbone's stages 1-4")
    check_bool("deform_unary", deform_unary)
    check_bool("checkpoint", checkpoint)
    check_int("min_size", min_size, hint="the shorter side of the resized images")
    check_int("max_size", max_size, hint="the longest the longer side may be")
    check_optional_int("table_size", table_size, hint="the input size the position tables are built for")
    check_optional_int("semantic_classes", semantic_classes, hint="HTC's semantic branch; None: without it")
    check_int("box_batch_size_per_image", box_batch_size_per_image)
    check_int("rpn_post_nms_top_n_train", rpn_post_nms_top_n_train)
    check_train_scales(train_scales)
    if semantic_classes and kind != "htc":
        raise ConfigError(f"the semantic branch is HTC's; {kind} has none (drop semantic_classes)")
    pretrained = pretrained_backbone is not None
    trainable = trainable_layers if trainable_layers is not None else (3 if pretrained else 5)
    frozen = frozen_bn if frozen_bn is not None else pretrained
    table = table_size or max([max_size, *(high for _, _, high in train_scales or [])])
    fpn = build_backbone(backbone, dcn_stages, deform_unary, trainable, frozen, int(table), checkpoint, impl)
    report = load_backbone_weights(fpn, pretrained_backbone, pos_init, backbone) if pretrained else None
    transform = DetectionTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD), train_scales)
    if kind in ("maskrcnn", "fasterrcnn"):
        model = (MaskRCNN if kind == "maskrcnn" else FasterRCNN)(
            fpn, num_classes=num_classes, box_batch_size_per_image=box_batch_size_per_image,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train)
        model.transform = transform
    else:
        # torchvision's Faster R-CNN defaults (its rpn_fg_iou_thresh, rpn_bg_iou_thresh, ...)
        anchors = _default_anchorgen()
        rpn = RegionProposalNetwork(
            anchor_generator=anchors, head=RPNHead(fpn.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n=dict(training=2000, testing=1000),
            post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=1000), nms_thresh=0.7)
        heads = build_cascade_heads(num_classes, htc=kind == "htc", masks=kind != "cascade_rcnn",
                                    semantic_classes=semantic_classes,
                                    out_channels=fpn.out_channels, batch_size_per_image=box_batch_size_per_image)
        model = GeneralizedRCNN(fpn, rpn, heads, transform)
    model.detector_kind = kind
    model.backbone_init = report
    return model


def check_backbone(backbone: object) -> None:
    """Raises :class:`ConfigError` unless ``backbone`` is a string (a name :func:`lesa.create_model` knows: it
    names an unknown one with the closest names)."""
    if not isinstance(backbone, str):
        module = " (a module is not taken: the detector builds its backbone from the name)" \
            if isinstance(backbone, nn.Module) else ""
        raise ConfigError(f"backbone must be a lesa model name (a string), got {type(backbone).__name__} "
                          f"{describe(backbone)}{module}; choose one of {', '.join(list_models())}")


def check_train_scales(train_scales: Optional[Sequence[Sequence[float]]]) -> None:
    """``None`` or ``[(probability, low, high), ...]`` with positive numbers; raises :class:`ConfigError`."""
    for i, scale in enumerate(train_scales or []):
        valid = isinstance(scale, Sequence) and len(scale) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scale)
        if not valid:
            raise ConfigError(f"train_scales[{i}]={describe(scale)} must be (probability, low, high), three positive "
                              "numbers: e.g. train_scales=[(1.0, 640, 800)]")


def build_maskrcnn(backbone: str, num_classes: int, **kwargs) -> MaskRCNN:
    """Mask R-CNN over a lesa backbone: :func:`build_detector` with ``kind='maskrcnn'``."""
    return build_detector("maskrcnn", backbone, num_classes, **kwargs)


def load_backbone_weights(backbone: LesaFPNBackbone, source: str | Path, pos_init: str = "reinit",
                          name: Optional[str] = None) -> dict[str, list[str]]:
    """Initialise ``backbone.body`` (the model ``name``) from a classification checkpoint; return what was skipped
    and why.

    Raises:
        CheckpointError: a detection run, or a file that records another model than ``name``.
    """
    found = read_weights(source)
    if found.task == "detection":
        raise CheckpointError(f"{source} is a detection run: --pretrained-backbone takes a classification checkpoint "
                              "(a lesa run or weights file, or the authors' converted one)")
    trained_as = found.config.get("model")
    if name and trained_as and trained_as != name:
        raise CheckpointError(f"{source} holds a {trained_as} (the file records it), not the backbone {name}: pass "
                              f"--backbone {trained_as}, or a checkpoint of {name}")
    sd = found.state_dict
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
