"""COCO-format instance segmentation data: reading (polygons and RLE masks), writing, and results.

A dataset is an annotation JSON in COCO's format plus an image folder. Category ids (COCO's run 1..90 with
gaps) map to contiguous labels ``1..K`` (0 is torchvision's background); :class:`CocoDetection` keeps both
directions of the map, so predictions go back out with the original ids.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from ..errors import DataError, NotFoundError
from .images import read_image, read_label_map


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:  # pragma: no cover - the det extra installs it
        raise ImportError("COCO data needs pycocotools: pip install 'lesa[det]'") from err
    return mask_utils


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The ``(H, W)`` uint8 mask of a COCO annotation (polygons, uncompressed or compressed RLE)."""
    mask_utils = _mask_utils()
    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(np.uint8)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a binary mask, JSON-ready."""
    rle = _mask_utils().encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def check_annotations(coco, annotation_file: Path, image_dir: Path) -> None:
    """Refuse, before any training, annotations that would fail or mislead later: unknown category ids,
    boxes that are not ``[x, y, w, h]``, empty or degenerate polygons, and missing image files."""
    categories = set(coco.cats)
    for ann in coco.dataset.get("annotations", []):
        where = f"{annotation_file}: annotation {ann.get('id')} (image {ann.get('image_id')})"
        if ann.get("category_id") not in categories:
            raise DataError(f"{where} has category_id {ann.get('category_id')!r}, which is not among the "
                            f"categories {sorted(categories)[:20]}; fix the id or add the category")
        if ann.get("image_id") not in coco.imgs:
            raise DataError(f"{where} refers to an image id that is not in 'images'; fix the image_id")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise DataError(f"{where} has bbox {bbox!r}; expected [x, y, width, height]")
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list) and (not segmentation or any(not p or len(p) % 2 for p in segmentation)):
            raise DataError(f"{where} has an empty polygon (or one with an odd number of coordinates); fix or "
                            "remove the annotation, or give it an RLE mask")
    missing = [info["file_name"] for info in coco.imgs.values() if not (image_dir / info["file_name"]).is_file()]
    if missing:
        raise DataError(f"{annotation_file}: {len(missing)} image file(s) listed there are missing from {image_dir} "
                        f"(e.g. {missing[0]}); copy them there or remove them from the annotations")


class CocoDetection(Dataset):
    """Images and Mask R-CNN targets (``boxes`` xyxy, ``labels``, ``masks``, ``image_id``, ...).

    ``train=True`` drops crowd annotations and images without objects, and flips images horizontally
    with probability ``flip``.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, train: bool = False, flip: float = 0.5,
                 semantic: Optional[str | Path] = None):
        from pycocotools.coco import COCO

        annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        if not annotation_file.is_file():
            raise NotFoundError(f"annotation file {str(annotation_file)!r} does not exist")
        if not self.image_dir.is_dir():
            raise NotFoundError(f"image folder {str(self.image_dir)!r} does not exist")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(annotation_file))
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # bad JSON, or not COCO's layout
            raise DataError(f"{annotation_file} is not a COCO annotation file ({type(err).__name__}: {err}); "
                            "expected JSON with 'images', 'annotations' and 'categories'") from None
        self.annotation_file = annotation_file
        check_annotations(self.coco, annotation_file, self.image_dir)
        self.semantic = semantic if semantic in (None, INSTANCE_SEMANTIC) else Path(semantic)
        if isinstance(self.semantic, Path) and not self.semantic.is_dir():
            raise NotFoundError(f"semantic map folder {str(self.semantic)!r} does not exist (COCO-stuff's "
                                "stuffthingmaps/<split>2017, one PNG per image)")
        self.train, self.flip = train, flip
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise DataError(f"{annotation_file} has no categories")
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.classes = [self.coco.cats[cid]["name"] for cid in self.category_ids]
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        if not ids:
            raise DataError(f"{annotation_file} has no {'annotated ' if train else ''}images")
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = pil_to_tensor(read_image(self.image_dir / info["file_name"])).float() / 255.0
        height, width = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not (self.train and a.get("iscrowd", 0))]
        boxes, labels, masks, areas, crowd = [], [], [], [], []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            if w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[ann["category_id"]])
            masks.append(torch.from_numpy(annotation_mask(ann, height, width)))
            areas.append(ann.get("area", w * h))
            crowd.append(ann.get("iscrowd", 0))
        target = dict(
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8),
            image_id=torch.tensor(image_id),
            area=torch.tensor(areas, dtype=torch.float32),
            iscrowd=torch.tensor(crowd, dtype=torch.int64),
        )
        if self.semantic is not None:
            target["semantic"] = self.semantic_map(info, anns, target)
        if self.train and random.random() < self.flip:
            image, target = hflip(image, target)
        return image, target


    def semantic_map(self, info: dict[str, Any], anns: list[dict], target: dict[str, Tensor]) -> Tensor:
        """The ``(H, W)`` int64 class map of an image for HTC's semantic branch: from COCO-stuff's PNG in
        the semantic folder, or (``semantic='instances'``) 0 on background and each object's label on its
        mask (the digit scenes: digit + 1 on the strokes)."""
        if self.semantic == INSTANCE_SEMANTIC:
            semantic = torch.zeros(target["masks"].shape[-2:], dtype=torch.int64)
            for label, mask in zip(target["labels"], target["masks"]):
                semantic[mask.bool()] = label
            return semantic
        path = self.semantic / f"{Path(info['file_name']).stem}.png"
        if not path.is_file():
            raise NotFoundError(f"semantic map {path} is missing (one PNG per image of {self.image_dir})")
        return torch.from_numpy(read_label_map(path))


INSTANCE_SEMANTIC = "instances"


def hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    target["masks"] = target["masks"].flip(-1)
    if "semantic" in target:
        target["semantic"] = target["semantic"].flip(-1)
    return image.flip(-1), target


def collate_detection(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_coco_results(dataset: CocoDetection, image_id: int, prediction: dict[str, Tensor],
                    mask_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """One image's Mask R-CNN output as COCO ``bbox`` and ``segm`` result entries."""
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
    """COCO AP (percent) of ``results`` (``{'bbox': [...], 'segm': [...]}``) against the dataset's JSON,
    over ``image_ids`` (default: all of the dataset's images); ``None`` where a size range has no objects."""
    from pycocotools.cocoeval import COCOeval

    out: dict[str, dict] = {}
    for iou_type in ("bbox", "segm"):
        entries = results.get(iou_type, [])
        if not entries:
            out[iou_type] = {name: 0.0 for name in STAT_NAMES}
            continue
        sink = io.StringIO() if quiet else None
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            detections = dataset.coco.loadRes(entries)
            evaluator = COCOeval(dataset.coco, detections, iouType=iou_type)
            evaluator.params.imgIds = list(image_ids or dataset.ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # pycocotools reports -1 where no ground truth falls in a range (e.g. no large objects): None.
        stats = [float(v) * 100.0 if v >= 0 else None for v in evaluator.stats[:6]]
        out[iou_type] = dict(zip(STAT_NAMES, stats))
    return out


def write_coco(path: str | Path, images: list[dict], annotations: list[dict], categories: list[dict],
               info: Optional[dict] = None) -> None:
    """Write a COCO annotation file (``images``, ``annotations``, ``categories``)."""
    from ..utils import atomic_write

    data = dict(info=info or {}, images=images, annotations=annotations, categories=categories)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
