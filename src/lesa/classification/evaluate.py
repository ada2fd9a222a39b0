"""Evaluating a classifier: loss, top-1 and top-5 over a split (one process or torchrun), the data's classes
mapped to the model's by name (a folder matches a class with ``/`` as ``_``), and the run's data found by its
identity (:mod:`lesa.engine.run_data`) when no ``--data`` is given.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import EMBEDDED, build_classification_data, list_image_folder
from ..engine.distributed import DistContext, cleanup_distributed, setup_distributed
from ..engine.run_data import fingerprint_files, is_folder_data, locate
from ..engine.task import Precision, Runtime, ShardSampler
from ..errors import ConfigError, DataError
from .predict import classification_data, load_trained_model


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


def suggested_data(cfg: dict[str, Any]) -> str:
    """`` (its data: --data NAME)`` where a weights file names a set lesa knows in its metadata, else the digits."""
    data = cfg.get("data")
    if data in EMBEDDED:
        return f" (the model's data: --data {data})"
    return " or --data digits" if not data else ""


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
