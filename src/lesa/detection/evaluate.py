"""COCO evaluation of a detector: box and mask AP over a validation split, one process or torchrun
(:func:`evaluate_detector`), and of a trained run on its data, found by identity, or another
(:func:`evaluate_run`, ``lesa det eval``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.coco import (
    CocoDetection,
    coco_evaluate,
    collate_detection,
    ground_truth_counts,
    to_coco_results,
)
from ..engine import (
    DistContext,
    ShardSampler,
    resolve_device,
    write_json,
)
from ..engine.run_data import locate
from ..errors import ConfigError, DataError
from ..outputs import check_not_inside
from ..ownership import check_folder, claim
from .config import EMBEDDED, coco_fingerprints, coco_splits
from .predict import load_detector

EVAL_KINDS = ("evaluation", "run")  # where det eval writes coco_eval.json: its own folder or the run's


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
