"""Training Mask R-CNN, Cascade Mask R-CNN and HTC with lesa backbones (``lesa det train``), a task on the one
training engine; their evaluation is :mod:`lesa.detection.evaluate`, drawings :mod:`lesa.detection.predict`.

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
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from ..data.coco import (
    CocoDetection,
    collate_training,
)
from ..engine import (
    DistContext,
    Runtime,
    SkippedImages,
    Step,
    Task,
    run_task,
    warmup_multistep,
    write_json,
)
from ..engine.run_data import identity
from ..errors import ConfigError, DataError, LesaError
from .config import EMBEDDED, NAMES, DetConfig, coco_fingerprints, coco_splits, has_masks, run_detector
from .detectors import BOX_ONLY, describe_init
from .evaluate import evaluate_detector
from .predict import detector_of

RPN_LOSSES = ["loss_objectness", "loss_rpn_box_reg"]
HEAD_LOSSES = ["loss_classifier", "loss_box_reg", "loss_mask"]


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


def train_detector(cfg: DetConfig) -> dict[str, Any]:
    """Train a detector as configured; under torchrun every process calls this."""
    return run_task(cfg, DetectionTask)
