"""Image classification on the one training engine (``lesa train``; evaluation is
:mod:`lesa.classification.evaluate`).

The task: a registered model (:func:`lesa.create_model`) on an embedded set or an ImageFolder root,
cross-entropy with optional label smoothing, the paper's warm-up + cosine schedule per step, top-1 / top-5
and loss on the validation split after every epoch, ``best.pt`` by validation top-1 and ``curves.png``.
Undecodable images are skipped and counted; the run stops once they exceed ``max_bad_fraction`` of the
training set (or of what was read, when more), from the first images on. ``init`` (``lesa train --init``)
starts a new run from a classification checkpoint's weights (:func:`init_model`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import EMBEDDED
from ..engine.checkpoint import load_checkpoint
from ..engine.distributed import DistContext
from ..engine.loop import run_task
from ..engine.records import plot_curves
from ..engine.run_data import fingerprint_files, identity, is_folder_data
from ..engine.task import Runtime, ShardSampler, SkippedImages, Step, Task, warmup_cosine
from ..errors import CheckpointError, DataError, NotFoundError
from ..models import create_model, resize_pos_embed
from ..options import flag
from ..weights import load_state
from .config import TrainConfig
from .evaluate import evaluate, topk_correct, unpack
from .predict import classification_data, model_img_size, read_classifier

COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_time_s"]


def fingerprint_listing(dataset: Any) -> str:
    """The fingerprint of an image-folder split as listed (:func:`lesa.engine.run_data.fingerprint_files`)."""
    return fingerprint_files(dataset.root, [path for path, _ in dataset.samples])


def training_subset(train: Dataset, size: Optional[int]) -> Dataset:
    """At most ``size`` images of ``train``, drawn at random with a fixed generator (the same for every seed,
    so that runs differing in seed or operation see the same images); all of them when ``size`` is unset or
    not smaller than the split."""
    if size is None or size >= len(train):
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    return Subset(train, order[:size].sort().values.tolist())


CURVE_METRIC = ("val_top1", "val top-1 (%)")  # the column drawn beside the losses (Fig. 5), its axis label


class ClassificationTask(Task):
    kind = "classification"
    best_metric = "val_top1"
    columns = COLUMNS
    resume_keys = ("model", "model_kwargs", "data", "img_size", "batch_size", "train_subset")

    def __init__(self, cfg: TrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.img_size = model_img_size(cfg.model, cfg.img_size)
        self.data = classification_data(cfg.model, cfg.data, self.img_size, root=cfg.data_root, download=cfg.download)
        self.model = (init_model(cfg, len(self.data.classes), self.img_size) if cfg.init else
                      create_model(cfg.model, num_classes=len(self.data.classes), img_size=self.img_size,
                                   **cfg.model_kwargs))
        self.train_set = training_subset(self.data.train, cfg.train_subset)
        self.val_loader = DataLoader(self.data.val, batch_size=cfg.val_batch_size or cfg.batch_size,
                                     num_workers=cfg.workers, collate_fn=self.data.collate,
                                     sampler=ShardSampler(len(self.data.val), ctx.rank, ctx.world_size),
                                     pin_memory=ctx.device.type == "cuda", persistent_workers=cfg.workers > 0)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.skipped = SkippedImages(cfg.max_bad_fraction, len(self.train_set))
        self.identity = self._identity()  # once: a fingerprint stats every file

    def collate(self, batch: list) -> Any:
        return self.data.collate(batch)

    def lr_schedule(self, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
        warmup = int(round(self.cfg.warmup_epochs * steps_per_epoch))
        total = epochs * steps_per_epoch
        return lambda step: warmup_cosine(step, warmup, total)

    def train_step(self, net: nn.Module, batch: Any, runtime: Runtime) -> Step:
        images, targets, bad = unpack(batch, self.data.may_skip)
        self.skipped.add(bad, len(targets))
        if len(targets) == 0:
            raise DataError("a whole batch of images could not be decoded; check the data folder")
        images, targets = runtime.images(images), targets.to(runtime.device, non_blocking=True)
        with runtime.precision.autocast(runtime.device):
            logits = net(images)
            loss = self.criterion(logits.float(), targets)
        top1 = topk_correct(logits.detach(), targets, (1,))[0]
        n = len(targets)
        return Step(loss, n, {"train_loss": loss.item(), "train_top1": 100.0 * top1 / n})

    def evaluate(self, net: nn.Module, runtime: Runtime) -> dict[str, float]:
        val = evaluate(net, self.val_loader, runtime.ctx, runtime.precision, self.data.may_skip, runtime.quiet,
                       runtime.channels_last)
        return dict(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])

    def finish(self, net: nn.Module, runtime: Runtime) -> dict[str, Any]:
        """The test split (where the data has one), once, with ``best.pt``'s weights: the epoch chosen by
        validation top-1. ``{}`` for data without a test split."""
        if self.data.test is None:
            return {}
        state = load_checkpoint(Path(self.cfg.output_dir) / "best.pt", kind=self.kind)
        self.model.load_state_dict(state["model"])
        test = self.data.test()
        loader = DataLoader(test, batch_size=self.cfg.val_batch_size or self.cfg.batch_size,
                            collate_fn=self.data.collate, sampler=ShardSampler(len(test), self.ctx.rank,
                                                                              self.ctx.world_size))
        metrics = evaluate(net, loader, runtime.ctx, runtime.precision, self.data.may_skip, runtime.quiet,
                           runtime.channels_last)
        return dict(test_top1=metrics["top1"], test_top5=metrics["top5"], test_loss=metrics["loss"],
                    test_images=metrics["n"], test_epoch=int(state["epoch"]))

    def describe(self, params: int) -> str:
        return f"{self.cfg.model}: {params / 1e6:.2f}M parameters, {len(self.train_set)} training images"

    def format_row(self, row: dict[str, float]) -> str:
        return (f"train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                f"val top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}% ({row['epoch_time_s']:.1f}s)"
                + (f"; {self.skipped.count} undecodable images skipped so far" if self.skipped.count else ""))

    def state_dict(self) -> dict[str, Any]:
        return dict(classes=self.data.classes, skipped=self.skipped.state, data_identity=self.data_identity())

    def data_identity(self) -> dict[str, Any]:
        return self.identity

    def _identity(self) -> dict[str, Any]:
        """What the run was trained on (:mod:`lesa.engine.run_data`): the data, its classes and split sizes, and
        for a folder its path relative to the run folder and each split's fingerprint."""
        described = dict(classes=list(self.data.classes), train_images=len(self.train_set),
                         val_images=len(self.data.val))
        if not is_folder_data(self.cfg.data, EMBEDDED):
            return dict(data=self.cfg.data, **described)
        fingerprints = {split: fingerprint_listing(dataset) for split, dataset in (("train", self.data.train),
                                                                                   ("val", self.data.val))}
        return identity(self.cfg.data, self.cfg.output_dir, fingerprints, **described)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped.state = list(state.get("skipped", [0.0, 0.0]))

    def write_outputs(self, out_dir: Path, history: list[dict[str, float]]) -> None:
        plot_curves({self.cfg.model: [history]}, out_dir / "curves.png", CURVE_METRIC,
                    f"{self.cfg.model} on {self.cfg.data}")

    def summary(self, last: dict[str, float]) -> dict[str, Any]:
        return dict(model=self.cfg.model, data=self.cfg.data, classes=list(self.data.classes), img_size=self.img_size,
                    val_top1=last.get("val_top1"),
                    val_top5=last.get("val_top5"), val_loss=last.get("val_loss"), skipped_images=self.skipped.count)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a classifier as configured; under torchrun every process calls this."""
    return run_task(cfg, ClassificationTask)


def init_model(cfg: TrainConfig, num_classes: int, img_size: int) -> nn.Module:
    """The model of a fine-tuning run (``--init``): built at the checkpoint's input size, loaded with all its
    weights but a classifier of another class count (re-initialised), then its position tables resized to
    ``img_size`` where that differs (a warning says so for each change).

    Raises:
        NotFoundError, CheckpointError: see :func:`read_classifier`, or weights that do not fit the model (the
            message starts with the option, ``--init``).
    """
    try:
        sd, run = read_classifier(cfg.init)
        trained_size = model_img_size(cfg.model, run.get("img_size"))
        model = create_model(cfg.model, num_classes=num_classes, img_size=trained_size, **cfg.model_kwargs)
        load_state(model, sd, cfg.init, num_classes_given=True)
    except (CheckpointError, NotFoundError) as err:
        raise type(err)(f"{flag('init')}: {err}") from None
    if trained_size == img_size:
        return model
    resize_pos_embed(model, img_size, flat=True)
    if any(".rel_pos." in k for k in sd):  # conv models have none
        warnings.warn(f"{cfg.init}: position tables resized from the checkpoint's {trained_size} px input to "
                      f"{img_size} px", stacklevel=2)
    return model
