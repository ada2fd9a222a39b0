"""COCO evaluation of a detector: box and mask AP over a validation split, one process or torchrun
(:func:`evaluate_detector`), and of a trained run on its data, found by identity, or another
(:func:`evaluate_run`, ``lesa det eval``); detections as COCO results entries (:func:`to_coco_results`) and
their AP against a :class:`~lesa.data.coco.CocoDetection`'s ground truth (:func:`coco_evaluate`).
"""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.coco import (
    CocoDetection,
    collate_detection,
    encode_mask,
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
    the data have masks; see :func:`coco_evaluate`), the run's ``categories`` with their
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


def to_coco_results(dataset: CocoDetection, image_id: int, prediction: dict[str, Tensor],
                    mask_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """One image's detections as COCO ``bbox`` and ``segm`` result entries, with the run's category ids."""
    boxes = prediction["boxes"].detach().cpu()
    scores = prediction["scores"].detach().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    category = [dataset.category_ids[label - 1] for label in labels]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    bbox = [dict(image_id=image_id, category_id=c, bbox=[round(v, 2) for v in b], score=s)
            for b, c, s in zip(xywh, category, scores)]
    segm = []
    if "masks" in prediction:
        masks = (prediction["masks"].detach().cpu()[:, 0] >= mask_threshold).numpy()
        segm = [dict(image_id=image_id, category_id=c, segmentation=encode_mask(m), score=s)
                for m, c, s in zip(masks, category, scores)]
    return bbox, segm


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_evaluate(dataset: CocoDetection, results: dict[str, list[dict]], quiet: bool = True,
                  image_ids: Optional[list[int]] = None) -> dict[str, dict]:
    """COCO AP (percent) of ``results`` against the dataset's ground truth over ``image_ids`` (default: all of
    the dataset's images), for each IoU type in ``results`` (``'bbox'``; ``'segm'`` where the model predicts
    masks) that the data has (no ``'segm'`` on box-only data).

    ``None`` exactly where a size range has no (non-crowd) ground truth, with or without detections; 0.0
    where it has ground truth and nothing was detected. The AP averages over the categories with ground
    truth in these images.
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = list(image_ids or dataset.ids)
    out: dict[str, dict] = {}
    for iou_type in [t for t in ("bbox", "segm") if t in results and (t == "bbox" or dataset.has_masks)]:
        if not results[iou_type]:  # pycocotools cannot load an empty result list
            out[iou_type] = stats_without_detections(dataset, image_ids)
            continue
        sink = io.StringIO() if quiet else None
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            detections = dataset.coco.loadRes(results[iou_type])
            evaluator = COCOeval(dataset.coco, detections, iouType=iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # pycocotools reports -1 where no ground truth falls in a range (e.g. no large objects): None.
        stats = [float(v) * 100.0 if v >= 0 else None for v in evaluator.stats[:6]]
        out[iou_type] = dict(zip(STAT_NAMES, stats))
    return out


def stats_without_detections(dataset: CocoDetection, image_ids: list[int]) -> dict[str, Optional[float]]:
    """The stats of no detections: 0.0 for each size range with non-crowd ground truth, None for the others
    (pycocotools' area ranges, bounds included as there)."""
    from pycocotools.cocoeval import Params

    ranges = dict(zip(Params().areaRngLbl, Params().areaRng))  # all, small, medium, large
    areas = [a["area"] for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=image_ids)) if not a["iscrowd"]]

    def stat(label: str) -> Optional[float]:
        low, high = ranges[label]
        return 0.0 if any(low <= area <= high for area in areas) else None

    return dict(zip(STAT_NAMES, [stat("all")] * 3 + [stat("small"), stat("medium"), stat("large")]))


def ground_truth_counts(dataset: CocoDetection, image_ids: list[int]) -> list[dict[str, Any]]:
    """The run's categories with their non-crowd ground-truth objects in ``image_ids`` (0: not in the AP)."""
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=image_ids))
    counts = Counter(a["category_id"] for a in anns if not a["iscrowd"])
    return [dict(c, ground_truth=counts[c["id"]]) for c in dataset.categories]


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
