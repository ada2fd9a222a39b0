"""The options of a detection run (``lesa det train``): :class:`DetConfig` with its data-dependent defaults
and the paper's schedules, the HTC presets, where a COCO root keeps its splits (:func:`coco_splits`) and the
fingerprint of its files (:mod:`lesa.engine.run_data`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import Field

from ..data.coco import (
    INSTANCE_SEMANTIC,
    MAX_REPAIRED,
)
from ..data.digit_scenes import ensure_digit_scenes
from ..engine import RunConfig, merge_config
from ..engine.config import run_directory
from ..engine.run_data import fingerprint_files
from ..errors import ConfigError, DataError, LesaError, NotFoundError
from ..layers.binary import IMPLS
from ..models.registry import check_model_options
from ..options import (
    NEGATABLE,
    NO_FLAG,
    ROLE_INPUT,
    ROLE_INPUT_FILE,
    ROLE_INPUT_TREE,
    Checkpoint,
    ImageSize,
    Name,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    metavar,
    schema,
)
from ..weights import read_weights
from .detectors import BOX_ONLY, DCN_STAGES, DETECTORS, POS_INIT, TRAINABLE_LAYERS

SCHEDULES = {"1x": (12, (8, 11)), "20e": (20, (16, 19))}
NAMES = {"maskrcnn": "Mask R-CNN", "cascade_maskrcnn": "Cascade Mask R-CNN", "htc": "HTC",
         "fasterrcnn": "Faster R-CNN", "cascade_rcnn": "Cascade R-CNN"}
DET_PRESETS = ("htc", "htc_1280")


def has_masks(detector: str) -> bool:
    """Whether ``detector`` predicts instance masks (the box-only ones are :data:`BOX_ONLY`'s values)."""
    return detector not in BOX_ONLY.values()


EMBEDDED = "digit-scenes"
# Options left unset take these by data: CPU-sized for the embedded digit scenes; torchvision's and
# mmdetection's usual COCO settings (800-1333 px, 2 images per GPU, 512 RoIs, 2000 proposals) otherwise.
DATA_DEFAULTS = {
    "embedded": {"batch_size": 4, "min_size": 320, "max_size": 512,
                 "box_batch_size_per_image": 128, "rpn_post_nms_top_n_train": 1000},
    "coco": {"batch_size": 2, "min_size": 800, "max_size": 1333,
             "box_batch_size_per_image": 512, "rpn_post_nms_top_n_train": 2000},
}


@schema
class DetConfig(RunConfig):
    """A detection run; the defaults train the CPU-sized LESA backbone on the embedded digit scenes."""

    TASK_OUTPUTS: ClassVar[tuple[str, ...]] = ("coco_eval.json",)

    # on box-only training data a mask detector becomes its box-only form (BOX_ONLY), said in one line
    detector: Optional[Literal[tuple(DETECTORS)]] = Field(None, description=(
        "default maskrcnn (with --resume: the run's); on box-only data (no 'segmentation') a mask detector trains as "
        "its box-only form: fasterrcnn, cascade_rcnn"))
    backbone: Name = Field("lesa_resnet_tiny", description="lesa model name (the paper: lesa_resnet50, ...)")
    data: Name = Field(default=EMBEDDED, json_schema_extra=ROLE_INPUT_TREE,
                       description=f"'{EMBEDDED}' (embedded) or a COCO root")
    preset: Optional[Literal[DET_PRESETS]] = Field(None, description="the paper's HTC recipe (Table 4)")
    semantic: Optional[bool] = Field(None, json_schema_extra=NEGATABLE, description=(
        "HTC's semantic branch (default: on where maps exist: digit scenes, --semantic-root)"))
    semantic_root: Optional[Name] = Field(None, json_schema_extra=ROLE_INPUT, description=(
        "COCO-stuff stuffthingmaps folder (with train2017/, val2017/), or 'instances': class maps drawn from the "
        "instance masks"))
    semantic_classes: Optional[PositiveInt] = Field(None, description=(
        "classes of the semantic maps, labels 0..N-1 (255: ignored; default 183 with --semantic-root (COCO-stuff), "
        "the categories + 1 with 'instances')"))
    # [[probability, low, high], ...]: longer side drawn per image
    train_scales: Optional[list[Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]]] = Field(
        None, json_schema_extra=NO_FLAG)
    schedule: Literal[tuple(SCHEDULES)] = Field(
        "1x", description="training length and lr steps, as mmdetection's schedules (1x: 12 epochs)")
    epochs: Optional[PositiveInt] = Field(None, description="override the schedule's length (its lr steps keep their "
                                                            "place)")
    batch_size: Optional[PositiveInt] = Field(None, description="images per process (default 4 on digit scenes, 2 on "
                                                                "COCO)")
    lr: PositiveFloat = Field(0.02, description="learning rate for --lr-base-batch images")
    lr_base_batch: PositiveInt = Field(16, description="the global batch --lr is given for (linear scaling)")
    warmup_iters: NonNegativeInt = Field(500, description="steps of linear learning-rate warm-up")
    warmup_ratio: Annotated[float, Field(gt=0, le=1)] = Field(0.001, json_schema_extra=NO_FLAG)
    min_size: Optional[ImageSize] = Field(None, description="shorter image side (default 320 on digit scenes, 800 on "
                                                            "COCO)")
    max_size: Optional[ImageSize] = Field(None, description="longer side at most (default 512 on digit scenes, 1333 "
                                                            "on COCO)")
    dcn_stages: list[Annotated[int, Field(ge=DCN_STAGES[0], le=DCN_STAGES[1])]] = Field(
        default_factory=list, description=(
        "stages with deformable 3x3 convs, e.g. 2 3 4"))
    deform_unary: bool = Field(False, description="deformable LESA unary term")
    pretrained_backbone: Optional[Checkpoint] = Field(None, json_schema_extra=ROLE_INPUT_FILE,
                                                      description="classification checkpoint of the same backbone")
    pos_init: Literal[POS_INIT] = Field("reinit", description="position tables from the checkpoint")
    trainable_layers: Optional[Annotated[int, Field(ge=TRAINABLE_LAYERS[0], le=TRAINABLE_LAYERS[1])]] = Field(
        None, description=(
        "backbone stages trained, 0-5 (default 3 with a pretrained backbone, else 5)"))
    # from scratch BN must train
    frozen_bn: Optional[bool] = Field(None, json_schema_extra=NEGATABLE, description=(
        "freeze the backbone's BatchNorms (default: with a pretrained backbone)"))
    checkpoint_layers: bool = Field(False, description="gradient checkpointing of the LESA terms")
    # RoIs per image for the box/mask heads
    box_batch_size_per_image: Optional[PositiveInt] = Field(None, json_schema_extra=NO_FLAG)
    # proposals kept in training
    rpn_post_nms_top_n_train: Optional[PositiveInt] = Field(None, json_schema_extra=NO_FLAG)
    impl: Literal[IMPLS] = Field("auto", description="binary-term implementation")
    max_eval_images: Optional[PositiveInt] = Field(None, description="evaluate on the first N validation images only")
    max_repaired: Annotated[float, Field(ge=0, le=1)] = Field(
        MAX_REPAIRED, json_schema_extra=metavar("FRACTION"),
        description="share of a COCO file's annotations that may be repaired (boxes clipped, boxes or polygons "
                    "outside the image dropped, ...) before the file is refused")
    output: Optional[Name] = run_directory("det-<backbone>-<data>")

    def __post_init__(self) -> None:
        # paths resolved once, here: eval / resume from another working folder find the same files
        self.data = resolved(self.data, keep=(EMBEDDED,))
        self.semantic_root = resolved(self.semantic_root, keep=(INSTANCE_SEMANTIC,))
        self.pretrained_backbone = resolved(self.pretrained_backbone)
        for name, value in DATA_DEFAULTS["embedded" if self.data == EMBEDDED else "coco"].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # The run's folder is named by the detector asked for, before it is resolved here or turned into its
        # box-only form by the data (choose_detector): it stays where the command found it.
        if self.output is None:
            self.output = str(self.output_dir)
        if self.detector is None:
            self.detector = (run_detector(self.output_dir) if self.resume else None) or "maskrcnn"
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = super().problems()
        try:
            check_model_options(self.backbone, {})
        except ConfigError as err:
            problems.append(f"--backbone: {err}")
        if self.semantic and self.detector != "htc":
            problems.append(f"--semantic is HTC's branch; {self.detector} has none (use --detector htc)")
        if self.semantic_classes and not self.with_semantic:
            problems.append("--semantic-classes sets the classes of HTC's semantic branch, which is off here "
                            "(use --detector htc with --semantic-root, or drop --semantic-classes)")
        if self.semantic and self.data != EMBEDDED and not self.semantic_root:
            problems.append("--semantic on COCO needs the COCO-stuff maps: pass --semantic-root (stuffthingmaps)")
        for scale in self.train_scales or []:
            if not scale[0] <= 1 or not scale[1] <= scale[2]:
                problems.append(f"train_scales entries are [probability, low, high] with probability <= 1 and "
                                f"low <= high (got {scale})")
        if len(set(self.dcn_stages)) < len(self.dcn_stages):
            problems.append(f"--dcn-stages {' '.join(map(str, self.dcn_stages))} names a stage twice: give each once")
        if self.pos_init != "reinit" and not self.pretrained_backbone:
            problems.append(f"--pos-init {self.pos_init} acts on the tables of --pretrained-backbone, which is not "
                            "given: pass it, or drop --pos-init")
        if self.min_size > self.max_size:
            problems.append(f"--min-size {self.min_size} exceeds --max-size {self.max_size}: the shorter side "
                            "cannot be longer than the longer one")
        return problems

    def default_run_name(self) -> str:
        kind = "" if self.detector in (None, "maskrcnn") else f"{self.detector}-"
        return f"det-{kind}{self.backbone}-{Path(self.data).name}"

    @property
    def with_semantic(self) -> bool:
        """Whether HTC's semantic branch is on (by default where maps exist)."""
        if self.semantic is not None:
            return self.semantic
        return self.detector == "htc" and (self.data == EMBEDDED or bool(self.semantic_root))

    def semantic_source(self, split: str) -> Optional[str | Path]:
        if not self.with_semantic:
            return None
        if self.data == EMBEDDED or self.semantic_root == INSTANCE_SEMANTIC:
            return INSTANCE_SEMANTIC
        return Path(self.semantic_root) / f"{split}2017"

    def total_epochs(self) -> int:
        return self.epochs or SCHEDULES[self.schedule][0]

    def lr_fractions(self) -> list[float]:
        """The lr steps of the schedule as fractions of training (they keep their place when ``epochs``
        changes the length)."""
        epochs, steps = SCHEDULES[self.schedule]
        return [s / epochs for s in steps]


def resolved(path: Optional[str], keep: tuple[str, ...] = ()) -> Optional[str]:
    """``path`` made absolute (``~`` expanded) where it exists; names in ``keep`` and missing paths as given (their
    readers name them)."""
    if path is None or path in keep:
        return path
    with contextlib.suppress(OSError, RuntimeError):
        candidate = Path(path).expanduser()
        if candidate.exists():
            return str(candidate.resolve())
    return path


def coco_fingerprints(data: str, splits: tuple[str, ...]) -> dict[str, str]:
    """Each split's fingerprint (:func:`lesa.engine.run_data.fingerprint_files`): its annotation file's bytes and
    the names and sizes of the files in its image folder."""
    found = {}
    for split, (annotation_file, images) in coco_splits(data, splits).items():
        files = [os.path.join(d, f) for d, _, names in os.walk(images) for f in names] if images.is_dir() else []
        found[split] = fingerprint_files(images, files, [annotation_file])
    return found


def build_det_config(config_file: Optional[str] = None, **overrides: Any) -> DetConfig:
    """Defaults < YAML file < explicit overrides (``None`` values are ignored)."""
    return merge_config(DetConfig, config_file, overrides.pop("preset", None), presets=DET_PRESETS, **overrides)


def coco_splits(data: str, needed: tuple[str, ...] = ("train", "val")) -> dict[str, tuple[Path, Path]]:
    """``{'train': (annotations, images), 'val': ...}`` (the ``needed`` splits) for the embedded digit scenes,
    COCO 2017's layout (``annotations/instances_train2017.json``, ``train2017/``) or ``train.json`` + ``train/``.

    Raises:
        NotFoundError: no such folder, or a needed split missing from it.
        DataError: ``data`` is a file (an annotation file given for the folder).
    """
    root = ensure_digit_scenes() if data == EMBEDDED else Path(data)
    if root.is_file():
        raise DataError(f"detection data {str(root)!r} is a file, not a COCO root folder: pass the folder that holds "
                        "train.json + train/ and val.json + val/ (or COCO 2017's annotations/instances_train2017.json "
                        "+ train2017/, ...)")
    if not root.is_dir():
        raise NotFoundError(f"detection data {str(root)!r} does not exist (a COCO root, or {EMBEDDED})")
    splits = {}
    for split in needed:
        for ann, images in ((root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
                            (root / f"{split}.json", root / split)):
            if ann.is_file():
                splits[split] = (ann, images)
                break
        else:
            raise NotFoundError(
                f"{root}: no {split} annotations (expected annotations/instances_{split}2017.json with "
                f"{split}2017/, or {split}.json with {split}/)")
    return splits


def run_detector(run: Path) -> Optional[str]:
    """The detector of the run in folder ``run`` (its ``last.pt``'s config); None where none can be read (the
    engine names a missing or bad checkpoint when it resumes)."""
    state = None
    with contextlib.suppress(LesaError):  # mapped: the config alone is read, the tensors stay on disk
        state = read_weights(Path(run) / "last.pt", mmap=True).contents
    config = state.get("config") if isinstance(state, dict) else None
    detector = config.get("detector") if isinstance(config, dict) else None
    return detector if detector in DETECTORS else None
