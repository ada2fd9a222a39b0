"""Image classification on the one training engine (``lesa train`` / ``lesa eval``).

The task: a registered model (:func:`lesa.create_model`) on an embedded set or an ImageFolder root,
cross-entropy with optional label smoothing, the paper's warm-up + cosine schedule per step, top-1 / top-5
and loss on the validation split after every epoch, ``best.pt`` by validation top-1 and ``curves.png``.
Undecodable images are skipped and counted; the run stops once they exceed ``max_bad_fraction`` of the
training set (or of what was read, when more), from the first images on. ``init`` (``lesa train --init``)
starts a new run from a classification checkpoint's weights (:func:`init_model`).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..data import EMBEDDED, build_classification_data, list_image_folder
from ..errors import CheckpointError, ConfigError, DataError, NotFoundError
from ..models import create_model, default_cfg, resize_pos_embed
from ..weights import load_state, model_state_dict, read_checkpoint, shared_prefix_note
from .checkpoint import COMMANDS_OF, load_checkpoint, run_kind
from .config import TrainConfig, flag
from .distributed import DistContext, cleanup_distributed, setup_distributed
from .loop import Precision, Runtime, ShardSampler, SkippedImages, Step, Task, run_task, warmup_cosine
from .records import plot_curves
from .run_data import fingerprint_files, identity, is_folder_data, locate

COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_time_s"]


def model_img_size(model: str, img_size: Optional[int] = None) -> int:
    return img_size or default_cfg(model)["input_size"][-1]


def classification_data(model: str, data: str, img_size: int, train: bool = True, root: Optional[str] = None,
                        download: bool = False):
    inputs = default_cfg(model)
    return build_classification_data(data, img_size, train=train, mean=inputs["mean"], std=inputs["std"],
                                     crop_pct=inputs["crop_pct"], root=root, download=download)


def fingerprint_listing(dataset: Any) -> str:
    """The fingerprint of an image-folder split as listed (:func:`lesa.engine.run_data.fingerprint_files`)."""
    return fingerprint_files(dataset.root, [path for path, _ in dataset.samples])


def folder_fingerprints(data: str, splits: tuple[str, ...]) -> dict[str, str]:
    """The fingerprints of ``splits`` of the image folder ``data``, each split listed alone."""
    return {split: fingerprint_files(Path(data) / split, [p for p, _ in list_image_folder(Path(data) / split).samples])
            for split in splits}


def run_data(checkpoint: str | Path, cfg: dict[str, Any], splits: tuple[str, ...] = ("val",)) -> Optional[str]:
    """The data of the run of ``checkpoint`` as seen from here: a named set as it is; a folder found by its
    identity (:func:`lesa.engine.run_data.locate`); the stored path for a run from before identities."""
    saved = cfg.get("data")
    ident = cfg.get("data_identity") or {}
    if not is_folder_data(saved, EMBEDDED) or not ident.get("fingerprints"):
        return saved
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    return locate(folder, ident, folder_fingerprints, splits)


def training_subset(train: Dataset, size: Optional[int]) -> Dataset:
    """At most ``size`` images of ``train``, drawn at random with a fixed generator (the same for every seed,
    so that runs differing in seed or operation see the same images); all of them when ``size`` is unset or
    not smaller than the split."""
    if size is None or size >= len(train):
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    return Subset(train, order[:size].sort().values.tolist())


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
        plot_curves({self.cfg.model: [history]}, out_dir / "curves.png", f"{self.cfg.model} on {self.cfg.data}")

    def summary(self, last: dict[str, float]) -> dict[str, Any]:
        return dict(model=self.cfg.model, data=self.cfg.data, classes=list(self.data.classes), img_size=self.img_size,
                    val_top1=last.get("val_top1"),
                    val_top5=last.get("val_top5"), val_loss=last.get("val_loss"), skipped_images=self.skipped.count)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a classifier as configured; under torchrun every process calls this."""
    return run_task(cfg, ClassificationTask)


# -- evaluation -------------------------------------------------------------------------------------------
def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets.unsqueeze(1)
    return [float(hits[:, : min(k, top.shape[1])].any(dim=1).sum()) for k in ks]


def unpack(batch, may_skip: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    if may_skip:
        return batch
    images, targets = batch
    return images, targets, 0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    precision: Optional[Precision] = None,
    may_skip: bool = False,
    quiet: bool = True,
    channels_last: bool = False,
    label_map: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the loader, summed over all processes; ``label_map[t]`` is the
    model's class of the loader's label ``t`` (data whose classes are the model's in another order)."""
    runtime = Runtime(ctx, precision or Precision(None, None), channels_last)
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, n, skipped
    for batch in tqdm(loader, desc="eval", leave=False, disable=quiet or None):
        images, targets, bad = unpack(batch, may_skip)
        sums[4] += bad
        if len(targets) == 0:
            continue
        if label_map is not None:
            targets = label_map[targets]
        images, targets = runtime.images(images), targets.to(ctx.device, non_blocking=True)
        with runtime.precision.autocast(ctx.device):
            logits = model(images)
        sums[0] += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        top1, top5 = topk_correct(logits, targets)
        sums[1] += top1
        sums[2] += top5
        sums[3] += len(targets)
    loss, top1, top5, n, bad = ctx.all_reduce_sum(sums)
    if n == 0:
        raise DataError("evaluation saw no decodable images")
    return dict(loss=loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, n=int(n), skipped=int(bad))


def read_classifier(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of a classifier's run directory (its ``best.pt``), training checkpoint or weights file, and
    its run's configuration with its ``classes`` (``{}`` for a bare weights file).

    Raises:
        NotFoundError, CheckpointError: an unreadable file (:func:`lesa.weights.read_checkpoint`), a detection
            run, or weights without a classifier.
    """
    state = read_checkpoint(checkpoint)
    is_run = isinstance(state, dict) and isinstance(state.get("model"), dict) and "epoch" in state
    if is_run and run_kind(state) != "classification":
        raise CheckpointError(f"{checkpoint} is a {run_kind(state)} run, not a classifier: "
                              f"{COMMANDS_OF[run_kind(state)]}")
    cfg = dict(state.get("config", {})) if is_run else {}
    if is_run and state.get("data_identity"):
        cfg["data_identity"] = state["data_identity"]
    if not is_run:  # a shipped weights file names its model, input size and classes in its metadata
        from ..models.pretrained import file_description

        cfg = file_description(checkpoint) or {}
    if is_run and state.get("classes") is not None:
        cfg["classes"] = list(state["classes"])
    sd = model_state_dict(state, checkpoint)
    if "fc.weight" not in sd:
        raise CheckpointError(f"{checkpoint}: no classifier weights (fc.weight) found{shared_prefix_note(sd)}; is "
                              "this a lesa classification model? (a detector: use `lesa det eval`)")
    return sd, cfg


def load_trained_model(checkpoint: str | Path, model_name: Optional[str] = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory (its ``best.pt``), a training checkpoint or a weights file, with the
    run's configuration (``{}`` for a bare weights file, which then needs ``model_name``)."""
    sd, cfg = read_classifier(checkpoint)
    name = model_name or cfg.get("model")
    if not name:
        raise ConfigError(f"{checkpoint} holds weights only: pass the model name (--model NAME)")
    img_size = model_img_size(name, cfg.get("img_size"))
    model = create_model(name, num_classes=sd["fc.weight"].shape[0], img_size=img_size, **cfg.get("model_kwargs", {}))
    load_state(model, sd, checkpoint)
    cfg.update(model=name, img_size=img_size)
    return model, cfg


def suggested_data(cfg: dict[str, Any]) -> str:
    """`` (its data: --data NAME)`` where a weights file names a set lesa knows in its metadata, else the digits."""
    data = cfg.get("data")
    if data in EMBEDDED:
        return f" (the model's data: --data {data})"
    return " or --data digits" if not data else ""


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


def folder_name(class_name: str) -> str:
    """The folder a class is kept in: its name with each ``/`` (which no folder name can hold) as ``_``
    (Fashion-MNIST's ``T-shirt/top`` -> ``T-shirt_top``)."""
    return class_name.replace("/", "_")


def class_map(model_classes: Optional[list[str]], data_classes: list[str], source: str) -> Optional[torch.Tensor]:
    """``label_map`` for :func:`evaluate`: the model's index of each of the data's classes, by name (a data
    folder matches a class by its exact name or its :func:`folder_name`); ``None`` when they are the same list
    (or the model's classes are unknown: a bare weights file).

    Raises:
        DataError: the data has a class the model was not trained on (named, with the fix).
    """
    if model_classes is None or list(model_classes) == list(data_classes):
        return None
    index = {name: i for i, name in enumerate(model_classes)}
    safe = Counter(folder_name(name) for name in model_classes)
    for i, name in enumerate(model_classes):
        if safe[folder_name(name)] == 1:  # a folder name two classes share matches neither
            index.setdefault(folder_name(name), i)
    unknown = [c for c in data_classes if c not in index]
    if unknown:
        raise DataError(f"the data has {len(data_classes)} classes and {source} was trained on "
                        f"{len(model_classes)}; not among the model's: {unknown[:5]} (model's: "
                        f"{list(model_classes)[:10]}); evaluate on data with the model's class folders (a '/' in a "
                        "class name is '_' in its folder's)")
    return torch.tensor([index[c] for c in data_classes])


def evaluate_model(model: nn.Module, data: str, img_size: int, batch_size: int = 128, device: str = "auto",
                   workers: int = 0, quiet: bool = False, model_name: Optional[str] = None,
                   classes: Optional[list[str]] = None, split: str = "val", root: Optional[str] = None,
                   download: bool = False) -> dict[str, Any]:
    """Loss, top-1 and top-5 of a classifier on the ``split`` (``'val'``, or ``'test'`` where the data has one)
    of ``data`` (one process or torchrun); ``model_name`` gives the normalisation of ImageFolder data
    (default: ImageNet's); ``classes`` (the model's, by name) map the data's labels when its classes come in
    another order or are a subset; ``root`` / ``download`` as :func:`lesa.data.build_classification_data`.

    Raises:
        ConfigError: ``split='test'`` for data without a test split.
    """
    ctx = setup_distributed(device)
    try:
        dataset = (classification_data(model_name, data, img_size, False, root, download) if model_name
                   else build_classification_data(data, img_size, train=False, root=root, download=download))
        if split == "test" and dataset.test is None:
            raise ConfigError(f"{data} has no test split (fashion-mnist has one); evaluate with --split val")
        images = dataset.test() if split == "test" else dataset.val
        label_map = class_map(classes, dataset.classes, model_name or "the model")
        outputs = getattr(getattr(model, "fc", None), "out_features", None)
        if classes is None and outputs is not None and outputs != len(dataset.classes):
            raise DataError(f"the model has {outputs} classes and {data} {len(dataset.classes)}, and a weights-only "
                            "file does not say which are which; evaluate its run directory or training checkpoint "
                            "(they store the class names), or data with the model's classes")
        model.to(ctx.device)
        loader = DataLoader(images, batch_size=batch_size, num_workers=workers, collate_fn=dataset.collate,
                            sampler=ShardSampler(len(images), ctx.rank, ctx.world_size))
        return evaluate(model, loader, ctx, None, dataset.may_skip, quiet or not ctx.is_main, label_map=label_map)
    finally:
        cleanup_distributed()


def evaluate_checkpoint(checkpoint: str | Path, data: Optional[str] = None, batch_size: int = 128,
                        device: str = "auto", workers: int = 0, quiet: bool = False,
                        model_name: Optional[str] = None,
                        within: Optional[Callable[[nn.Module], contextlib.AbstractContextManager]] = None,
                        split: str = "val", root: Optional[str] = None, download: bool = False) -> dict[str, Any]:
    """Evaluate a run directory (its best.pt), a training checkpoint or a weights file on ``split`` of ``data``
    (default: the run's data, found where the run found it); ``within(model)`` is a context to evaluate in (an
    analysis changing the model for the evaluation, say)."""
    model, cfg = load_trained_model(checkpoint, model_name)
    if not (data or cfg.get("data")):
        raise ConfigError(f"no data to evaluate on: pass --data PATH{suggested_data(cfg)}")
    if data is None or data == cfg.get("data"):
        data, root = run_data(checkpoint, cfg), root or cfg.get("data_root")
    with within(model) if within else contextlib.nullcontext():
        metrics = evaluate_model(model, data, cfg["img_size"], batch_size, device, workers, quiet, cfg["model"],
                                 cfg.get("classes"), split, root, download)
    return dict(model=cfg["model"], data=data, split=split, checkpoint=str(checkpoint), **metrics)
