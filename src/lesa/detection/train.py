"""Training and COCO evaluation of Mask R-CNN, Cascade Mask R-CNN and HTC with lesa backbones
(``lesa det train / eval / predict``), a task on the one training engine.

Schedules as the paper (Sec. 4.2): ``1x`` = 12 epochs with the learning rate divided by 10 after epochs
8 and 11, ``20e`` = 20 epochs with steps after 16 and 19; SGD (momentum 0.9, weight decay 1e-4), lr 0.02
per 16 images scaled linearly, 500 linear warm-up iterations from 0.1% (at most a quarter of a short
run). ``epochs`` overrides the schedule's length and keeps its steps at the same fractions. The run
directory is laid out as for classification (``config.yaml``, ``metrics.csv``, ``tb/``, ``last.pt``,
``best.pt``, ``summary.json``) plus ``coco_eval.json`` (box and mask AP, AP50, AP75, APs/APm/APl in
percent, the run's categories with their ground truth, and the validation data's one-line summary) after
every evaluation.

Policies:

* **One category mapping per run**, the training file's (``[{id, name}]`` in every checkpoint); the
  validation file and any file given to ``det eval`` are read through it (see :mod:`lesa.data.coco`).
* **No epoch is lost to evaluation.** The engine writes ``last.pt`` once an epoch is trained, before its
  evaluation; a failing evaluation is held back until the epoch's row is saved too (its metrics NaN), then
  stops the run with one line naming that checkpoint and the ``det eval`` command that re-runs it.
* **Box-only training data** (no ``segmentation``, or ``null`` / ``[]`` in every annotation) trains the asked
  mask detector's box-only form (Faster R-CNN, Cascade R-CNN; :func:`choose_detector`), said in one line;
  evaluation reports box AP only.
* **A resumed run keeps its detector.** Without ``--detector`` (command line, YAML or preset) ``--resume``
  builds the detector the run saved; a ``--detector`` that would build another one (on this data) is one
  line naming the run's.
* ``det predict`` names each input it cannot read (a folder too) on stderr, skips it and does the others.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.coco import (
    INSTANCE_SEMANTIC,
    MAX_REPAIRED,
    CocoDetection,
    coco_evaluate,
    collate_detection,
    collate_training,
    ground_truth_counts,
    semantic_class_count,
    to_coco_results,
)
from ..data.digit_scenes import ensure_digit_scenes
from ..engine import (
    DistContext,
    RunConfig,
    Runtime,
    ShardSampler,
    SkippedImages,
    Step,
    Task,
    load_checkpoint,
    merge_config,
    resolve_device,
    run_task,
    warmup_multistep,
    write_json,
)
from ..engine.run_data import fingerprint_files, identity, locate
from ..errors import BadImageError, ConfigError, DataError, LesaError, NotFoundError
from ..models.registry import check_model_options
from ..options import (
    ROLE_INPUT,
    ROLE_INPUT_TREE,
    Checkpoint,
    ImageSize,
    Name,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    schema,
)
from ..outputs import check_not_inside
from ..ownership import check_folder, claim
from ..utils import atomic_write
from .detectors import BOX_ONLY, DETECTORS, POS_INIT, build_detector, describe_init
from .visualize import draw_prediction, load_image

SCHEDULES = {"1x": (12, (8, 11)), "20e": (20, (16, 19))}
RPN_LOSSES = ["loss_objectness", "loss_rpn_box_reg"]
HEAD_LOSSES = ["loss_classifier", "loss_box_reg", "loss_mask"]
NAMES = {"maskrcnn": "Mask R-CNN", "cascade_maskrcnn": "Cascade Mask R-CNN", "htc": "HTC",
         "fasterrcnn": "Faster R-CNN", "cascade_rcnn": "Cascade R-CNN"}
DET_PRESETS = ("htc", "htc_1280")
EVAL_KINDS = ("evaluation", "run")  # where det eval writes coco_eval.json: its own folder or the run's


def has_masks(detector: str) -> bool:
    """Whether ``detector`` predicts instance masks (the box-only ones are :data:`BOX_ONLY`'s values)."""
    return detector not in BOX_ONLY.values()


def loss_names(detector: str, semantic: bool) -> list[str]:
    """The loss terms a detector reports, in the order of ``metrics.csv``."""
    head = HEAD_LOSSES if has_masks(detector) else HEAD_LOSSES[:2]
    if detector in ("maskrcnn", "fasterrcnn"):
        return head + RPN_LOSSES
    stages = [f"s{i}.{name}" for i in range(3) for name in head]
    return stages + RPN_LOSSES + (["loss_semantic"] if semantic else [])


def eval_column_names(detector: str) -> list[str]:
    """The AP columns of ``metrics.csv``: box AP / AP50, and mask AP / AP50 for the mask detectors."""
    iou_types = ("bbox", "segm") if has_masks(detector) else ("bbox",)
    return [f"{iou_type}_{stat}" for iou_type in iou_types for stat in ("AP", "AP50")]
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

    # default: maskrcnn, or with --resume the run's detector; on box-only training data a mask detector becomes
    # its box-only form (BOX_ONLY), said in one line
    detector: Optional[Literal[tuple(DETECTORS)]] = None
    backbone: Name = "lesa_resnet_tiny"
    data: Name = Field(default=EMBEDDED, json_schema_extra=ROLE_INPUT_TREE)
    preset: Optional[Literal[DET_PRESETS]] = None
    semantic: Optional[bool] = None  # HTC's semantic branch; default: where maps exist (digit scenes, semantic_root)
    # COCO-stuff stuffthingmaps (train2017/, val2017/), or 'instances'
    semantic_root: Optional[Name] = Field(default=None, json_schema_extra=ROLE_INPUT)
    semantic_classes: Optional[PositiveInt] = None  # default: 183 with semantic_root (COCO-stuff), classes + 1
    # [[probability, low, high], ...]: longer side drawn per image
    train_scales: Optional[list[Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]]] = None
    schedule: Literal[tuple(SCHEDULES)] = "1x"
    lr: PositiveFloat = 0.02
    lr_base_batch: PositiveInt = 16
    warmup_iters: NonNegativeInt = 500
    warmup_ratio: Annotated[float, Field(gt=0, le=1)] = 0.001
    min_size: Optional[ImageSize] = None
    max_size: Optional[ImageSize] = None
    dcn_stages: list[Annotated[int, Field(ge=1, le=4)]] = field(default_factory=list)
    deform_unary: bool = False
    pretrained_backbone: Optional[Checkpoint] = Field(default=None, json_schema_extra=ROLE_INPUT)
    pos_init: Literal[POS_INIT] = "reinit"
    trainable_layers: Optional[Annotated[int, Field(ge=0, le=5)]] = None  # default: 3 if pretrained, else all (5)
    frozen_bn: Optional[bool] = None  # default: frozen with a pretrained backbone; from scratch BN must train
    checkpoint_layers: bool = False
    box_batch_size_per_image: Optional[PositiveInt] = None  # RoIs per image for the box/mask heads
    rpn_post_nms_top_n_train: Optional[PositiveInt] = None  # proposals kept in training
    impl: Literal["reference", "fused", "auto"] = "auto"
    max_eval_images: Optional[PositiveInt] = None
    # share of a COCO file's annotations that may be repaired (clipped or dropped) before it is refused
    max_repaired: Annotated[float, Field(ge=0, le=1)] = MAX_REPAIRED

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


class DetectionTask(Task):
    """Mask R-CNN, Cascade Mask R-CNN, HTC or their box-only forms (Faster R-CNN, Cascade R-CNN: on box-only
    training data, see :func:`choose_detector`) with a lesa backbone on COCO-format data (see the module
    docstring).

    Raises:
        DataError: HTC's semantic branch on box-only data, a validation file with a category the training file
            lacks that an annotation uses, and the data errors of :class:`lesa.data.coco.CocoDetection`.
        ConfigError: ``--resume`` with a ``--detector`` that would not build the run's detector on this data.
    """

    kind = "detection"
    best_metric = "bbox_AP"
    resume_keys = ("detector", "backbone", "data", "batch_size", "dcn_stages", "deform_unary", "semantic")

    def __init__(self, cfg: DetConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        splits = coco_splits(cfg.data)
        self.train_set = CocoDetection(*splits["train"], train=True, semantic=cfg.semantic_source("train"),
                                       semantic_classes=cfg.semantic_classes, max_repaired=cfg.max_repaired)
        self.choice = choose_detector(cfg, self.train_set, run_detector(cfg.output_dir) if cfg.resume else None)
        self.val_set = CocoDetection(*splits["val"], train=False, categories=self.train_set.categories,
                                     max_repaired=cfg.max_repaired)
        self.model = detector_of(cfg, self.train_set.classes)
        self.skipped = SkippedImages(cfg.max_bad_fraction, len(self.train_set))
        self.losses = loss_names(cfg.detector, cfg.with_semantic)
        self.eval_columns = eval_column_names(cfg.detector)
        self.columns = ["epoch", "loss", *self.losses, *self.eval_columns, "lr", "epoch_time_s"]
        described = dict(classes=list(self.train_set.classes), train_images=len(self.train_set),
                         val_images=len(self.val_set))
        self.identity = (identity(cfg.data, cfg.output_dir, coco_fingerprints(cfg.data, ("train", "val")), **described)
                         if cfg.data != EMBEDDED else dict(data=cfg.data, **described))
        self.evaluation: dict[str, Any] = {}
        self.failure: Optional[Exception] = None

    @classmethod
    def same_setting(cls, key: str, saved: Any, current: Any) -> bool:
        """A box-only run may resume under the mask detector it was asked as (``detector``, see :data:`BOX_ONLY`):
        the engine asks before the data is read; :func:`choose_detector` then checks that the data turns it
        into the run's detector."""
        return saved == current or (key == "detector" and saved == BOX_ONLY.get(current))

    def collate(self, batch: list) -> Any:
        return collate_training(batch)

    def lr_schedule(self, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
        total = epochs * steps_per_epoch
        milestones = [int(round(f * total)) for f in self.cfg.lr_fractions()]
        # 500 warm-up iterations suit COCO's ~90k; a short run warms up over at most a quarter of itself.
        warmup = min(self.cfg.warmup_iters, max(1, total // 4))
        return lambda step: warmup_multistep(step, warmup, milestones, self.cfg.warmup_ratio)

    def train_step(self, net: nn.Module, batch: Any, runtime: Runtime) -> Step:
        images, targets, bad = batch
        self.skipped.add(bad, len(images))
        if not images:
            raise DataError("a whole batch of training images could not be decoded (the warnings name them); fix "
                            "or remove them")
        images = [im.to(runtime.device) for im in images]
        targets = [{k: v.to(runtime.device) for k, v in t.items()} for t in targets]
        with runtime.precision.autocast(runtime.device):
            losses = net(images, targets)
        loss = sum(losses.values())
        stats = {"loss": loss.item(), **{name: float(losses[name].detach()) if name in losses else 0.0
                                         for name in self.losses}}
        return Step(loss, 1.0, stats)

    def evaluate(self, net: nn.Module, runtime: Runtime) -> dict[str, float]:
        """The AP columns (NaN where undefined). A failure is kept for :meth:`format_row`, which the engine
        calls once the epoch's row is saved, so that the run's files are complete before it stops."""
        self.failure = None
        try:
            self.evaluation = evaluate_detector(self.model, self.val_set, runtime.ctx, self.cfg.max_eval_images,
                                                runtime.quiet)
        except Exception as err:  # whatever failed (a bug too), the epoch is saved first
            self.evaluation, self.failure = {}, err
        return eval_columns(self.evaluation, self.eval_columns)

    def describe(self, params: int) -> str:
        semantic = " with the semantic branch" if self.cfg.with_semantic else ""
        notes = [d.summary for d in (self.train_set, self.val_set)
                 if d.repairs.annotations or d.stored or d.ignored_categories]
        notes += [self.choice] if self.choice else []
        return "; ".join([f"{NAMES[self.cfg.detector]}{semantic} + {self.cfg.backbone}-FPN: {params / 1e6:.2f}M "
                          f"parameters, {len(self.train_set)} training images; "
                          f"{describe_init(self.model.backbone_init)}", *notes])

    def format_row(self, row: dict[str, float]) -> str:
        """One line on the epoch. Raises the epoch's evaluation failure (see :meth:`evaluate`) as a
        :class:`LesaError` naming the saved checkpoint and how to re-run the evaluation."""
        if self.failure is not None:
            raise evaluation_failed(self.failure, int(row["epoch"]), Path(self.cfg.output_dir)) from self.failure
        skipped = f"; {self.skipped.count} undecodable images skipped so far" if self.skipped.count else ""
        if "segm_AP" not in row:
            return f"loss {row['loss']:.3f}, box AP {ap_text(row['bbox_AP'])} ({row['epoch_time_s']:.0f}s){skipped}"
        mask = sum(row[name] for name in self.losses if name.endswith("loss_mask"))
        return (f"loss {row['loss']:.3f} (mask {mask:.3f}), box AP {ap_text(row['bbox_AP'])}, "
                f"mask AP {ap_text(row['segm_AP'])} ({row['epoch_time_s']:.0f}s){skipped}")

    def state_dict(self) -> dict[str, Any]:
        return dict(classes=self.train_set.classes, category_ids=self.train_set.category_ids,
                    categories=self.train_set.categories, skipped=self.skipped.state, data_identity=self.identity)

    def data_identity(self) -> dict[str, Any]:
        return self.identity

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On resume: the training file still has the run's categories, ids and names.

        Raises:
            DataError: a category id changed (the engine has compared the names already).
        """
        self.skipped.state = list(state.get("skipped", [0.0, 0.0]))
        saved = state.get("categories")
        if saved is not None and saved != self.train_set.categories:
            changed = next(f"{a['id']} {a['name']!r} -> {b['id']} {b['name']!r}"
                           for a, b in zip(saved, self.train_set.categories) if a != b)
            raise DataError(f"--resume: the run in {self.cfg.output_dir} has another category mapping than "
                            f"{self.train_set.annotation_file} ({changed}); resume with the run's data, or start a "
                            "new run with another --output")

    def write_outputs(self, out_dir: Path, history: list[dict[str, float]]) -> None:
        if self.evaluation:  # a failed evaluation leaves the previous epoch's file
            write_json(out_dir / "coco_eval.json", self.evaluation)

    def summary(self, last: dict[str, float]) -> dict[str, Any]:
        return dict(detector=self.cfg.detector, backbone=self.cfg.backbone, data=self.cfg.data,
                    bbox_AP=finite(last.get("bbox_AP")),
                    segm_AP=finite(last.get("segm_AP")), skipped_images=self.skipped.count)


def choose_detector(cfg: DetConfig, data: CocoDetection, resumed: Optional[str] = None) -> Optional[str]:
    """On box-only training ``data``, turn ``cfg.detector`` into its box-only form (:data:`BOX_ONLY`) and
    return the one line that says so; None when nothing changes. ``resumed``: the detector of the run being
    resumed, which the result must be.

    Raises:
        DataError: box-only data with HTC's semantic branch asked for (its maps come with masked data), or a
            run with masks resumed on data that has none.
        ConfigError: ``cfg.detector`` does not become the resumed run's detector on this data (a mask detector
            asked on masked data to resume a box-only run).
    """
    asked = cfg.detector
    built = BOX_ONLY[asked] if not data.has_masks and has_masks(asked) else asked
    if resumed is not None and built != resumed:
        run = f"--resume: the run in {cfg.output_dir} is a {NAMES[resumed]} run ({resumed})"
        if built != asked:
            raise DataError(f"{run}, but {data.annotation_file} has boxes only now (no 'segmentation'), on which "
                            f"{NAMES[asked]} trains as {NAMES[built]}; resume with the run's data, or start a new "
                            "run with another --output")
        kind = "masks" if data.has_masks else "boxes only"
        raise ConfigError(f"{run}; --detector {asked} builds {NAMES[built]} on {data.annotation_file.name} ({kind}), "
                          f"which cannot continue it: pass --detector {resumed}, or leave --detector out (a resumed "
                          "run keeps its detector)")
    if built == asked:
        return None
    if cfg.with_semantic:
        raise DataError(f"{data.annotation_file} is box-only (no annotation has a 'segmentation'): HTC with the "
                        "semantic branch needs instance masks; add masks, or drop --semantic-root / --semantic")
    cfg.detector = built
    return (f"{data.annotation_file.name} has boxes only (no 'segmentation'): training {NAMES[built]}, "
            f"{NAMES[asked]} without its mask heads (box AP only)")


def run_detector(run: Path) -> Optional[str]:
    """The detector of the run in folder ``run`` (its ``last.pt``'s config); None where none can be read (the
    engine names a missing or bad checkpoint when it resumes)."""
    path = Path(run) / "last.pt"
    state = None
    with contextlib.suppress(Exception):  # mmap: the config alone is read, the tensors stay on disk
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if state is None:
        with contextlib.suppress(LesaError):  # a checkpoint torch cannot map (written by torch's legacy format)
            state = load_checkpoint(path)
    config = state.get("config") if isinstance(state, dict) else None
    detector = config.get("detector") if isinstance(config, dict) else None
    return detector if detector in DETECTORS else None


def ap_text(value: Optional[float]) -> str:
    """An AP for the epoch line: ``-`` where it is undefined (no ground truth: masks on box-only data)."""
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def eval_columns(evaluation: dict[str, Any], columns: list[str]) -> dict[str, float]:
    """The epoch row's AP ``columns`` from a :func:`evaluate_detector` result; NaN where undefined (no ground
    truth, box-only data, a failed evaluation)."""
    def value(column: str) -> float:
        iou_type, stat = column.split("_")
        found = evaluation.get(iou_type, {}).get(stat)
        return math.nan if found is None else found

    return {column: value(column) for column in columns}


def finite(value: Optional[float]) -> Optional[float]:
    """``value``, or None for a missing or NaN metric (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else value


def evaluation_failed(cause: Exception, epoch: int, out: Path) -> LesaError:
    """The one-line error of an evaluation that failed after ``epoch`` was saved in ``out/last.pt``."""
    checkpoint = out / "last.pt"
    return LesaError(f"the evaluation after epoch {epoch} failed ({type(cause).__name__}: {cause}); the epoch is "
                     f"saved in {checkpoint}: fix the cause, then `lesa det eval --checkpoint {checkpoint}` evaluates "
                     f"it and `lesa det train ... --output {out} --resume` continues the run")


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


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: CocoDetection, ctx: DistContext,
                      max_images: Optional[int] = None, quiet: bool = True, batch_size: int = 2) -> dict[str, Any]:
    """COCO AP over the first ``max_images`` images of ``dataset`` (``bbox``, and ``segm`` where the model and
    the data have masks; see :func:`lesa.data.coco.coco_evaluate`), the run's ``categories`` with their
    ground truth there, the data's one-line summary (``data``) and ``skipped_images``: the ids of images that
    could not be decoded, left out of AP (a warning names each). All processes share the images and score
    the gathered results.

    Raises:
        Exception: this process's failure, or a RuntimeError naming another process's: every process raises,
            so that none waits for the others.
    """
    model.eval()
    count = min(len(dataset), max_images or len(dataset))
    try:
        results, failure = detect(model, dataset, ctx, count, quiet, batch_size), None
    except Exception as err:  # told to the other processes first, then raised
        results, failure = {}, err
    if ctx.distributed:
        parts = ctx.gather((results, None if failure is None else f"{type(failure).__name__}: {failure}"))
        failed = [(rank, message) for rank, (_, message) in enumerate(parts) if message]
        if failed and failure is None:
            raise RuntimeError(f"process {failed[0][0]} failed to evaluate: {failed[0][1]}")
        keys = {key for part, _ in parts for key in part}  # 'segm' where the model predicts masks
        results = {key: [r for part, _ in parts for r in part.get(key, [])] for key in keys}
    if failure is not None:
        raise failure
    read = set(results.pop("image_ids"))
    image_ids = [i for i in dataset.ids[:count] if i in read]
    if not image_ids:
        raise DataError(f"none of the {count} evaluation images of {dataset.annotation_file} could be decoded (the "
                        "warnings name them)")
    return {**coco_evaluate(dataset, results, quiet=True, image_ids=image_ids),
            "categories": ground_truth_counts(dataset, image_ids), "data": dataset.summary,
            "skipped_images": [i for i in dataset.ids[:count] if i not in read]}


def detect(model: nn.Module, dataset: CocoDetection, ctx: DistContext, count: int, quiet: bool,
           batch_size: int) -> dict[str, list[dict]]:
    """COCO result entries of this process's share of the first ``count`` images, with the run's category
    ids: ``bbox``, and ``segm`` when the model predicts masks; ``image_ids``: the images read (an undecodable
    one is left out)."""
    sampler = ShardSampler(count, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate_detection)
    results: dict[str, list] = {"bbox": [], "image_ids": []}
    for images, targets in tqdm(loader, desc="COCO eval", leave=False, disable=quiet or None):
        if not images:
            continue
        outputs = model([im.to(ctx.device) for im in images])
        results["image_ids"] += [int(t["image_id"]) for t in targets]
        for target, output in zip(targets, outputs):
            bbox, segm = to_coco_results(dataset, int(target["image_id"]), output)
            results["bbox"] += bbox
            if "masks" in output:
                results.setdefault("segm", []).extend(segm)
    return results


def train_detector(cfg: DetConfig) -> dict[str, Any]:
    """Train a detector as configured; under torchrun every process calls this."""
    return run_task(cfg, DetectionTask)


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


def evaluate_run(checkpoint: str | Path, data: Optional[str] = None, device: str = "auto",
                 max_images: Optional[int] = None, output: Optional[str | Path] = None) -> tuple[dict, Path]:
    """COCO AP of a trained detector on its (or ``data``'s) validation split, read through the run's category
    mapping, written to ``coco_eval.json`` in ``output`` (default: the run directory); returns the result
    (see :func:`evaluate_detector`) and that path.

    Raises:
        DataError: a category the run does not know, and the data errors of CocoDetection.
    """
    dev = resolve_device(device)
    model, cfg, state = load_detector(checkpoint)
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    folder = Path(output or run_dir)
    check_folder(folder, EVAL_KINDS, "--output")
    model.to(dev)
    if data is None:
        data = located_data(run_dir, state["config"]["data"], state.get("data_identity"))  # as stored, unresolved
        check_not_inside(folder, Path(data), f"--output {folder}")
    dataset = CocoDetection(*coco_splits(data, ("val",))["val"], categories=state["categories"],
                            max_repaired=cfg.max_repaired)
    result = evaluate_detector(model, dataset, DistContext(device=dev), max_images, quiet=False)
    claim(folder, "evaluation", EVAL_KINDS)
    path = folder / "coco_eval.json"
    write_json(path, result)
    return result, path


def located_data(run_dir: Path, data: str, saved: Optional[dict[str, Any]]) -> str:
    """A detection run's data as seen from here (:func:`lesa.engine.run_data.locate`); a run from before data
    identities: its path if absolute (a relative one was relative to a folder no longer known: refused)."""
    if data == EMBEDDED:
        return data
    if saved and saved.get("fingerprints"):
        return locate(run_dir, saved, coco_fingerprints, ("val",))
    if not Path(data).is_absolute():
        raise ConfigError(f"the run stored its data as the relative path {data!r}, relative to the folder it was "
                          "started from: pass --data with that folder")
    return data


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
