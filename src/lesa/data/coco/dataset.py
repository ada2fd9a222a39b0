"""The COCO dataset, :class:`CocoDetection`: loading a file (validated, repaired, its image files checked),
each image's targets (boxes, labels, masks, HTC's semantic map), the horizontal flip and the collate functions.

* **Report.** ``summary`` is one line with the counts (the training command prints it when something was
  repaired); ``repairs`` has the numbers.
* **Semantic maps** (HTC): an image's map is its ``file_name`` relative to the image folder with ``.png``, in
  the map folder (``a/x.jpg`` -> ``MAPS/a/x.png``; COCO-stuff's flat layout is the case of flat names). Each
  map of an image read is checked to exist when loaded (not decoded: an undecodable map, like an undecodable
  image, is found when read); two images whose maps would be one file are refused. When read: single-channel,
  the image's size, labels in ``[0, semantic_classes)`` or 255 (ignored); otherwise a one-line
  :class:`DataError` naming the map.
"""
from __future__ import annotations

import contextlib
import io
import random
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from ...errors import BadImageError, DataError, NotFoundError
from ..images import read_image, read_label_map
from .categories import IGNORE_LABEL, INSTANCE_SEMANTIC, run_categories, semantic_class_count
from .image_files import UNDO_ORIENTATION, check_image_files
from .repairs import MAX_REPAIRED, Repairs, clean_annotation
from .schema import check_references, has_masks, read_coco_file


class CocoDetection(Dataset):
    """Images and detection targets (``boxes`` xyxy, ``labels``, ``masks`` unless box-only, ``image_id``, ...)
    of a COCO file, validated and repaired when loaded (see the policies of :mod:`lesa.data.coco`).

    ``train=True`` drops crowd annotations and images without objects, and flips images horizontally with
    probability ``flip``. ``categories`` is the run's mapping (``[{id, name}]``; default: this file's).
    ``semantic`` adds HTC's ``semantic`` target: a folder of maps, or ``'instances'``, with
    ``semantic_classes`` classes (default: :func:`semantic_class_count`).

    Attributes: ``categories``, ``category_ids``, ``classes`` (the run's, label ``i`` is entry ``i - 1``),
    ``has_masks``, ``summary`` (one line of counts), ``repairs``, ``stored`` (``{image id: EXIF orientation}``
    of the images read as stored), ``coco`` (pycocotools' index of the repaired file: the evaluation's ground
    truth).

    Raises:
        NotFoundError: no such annotation file, image folder or semantic map folder.
        DataError: see the policies of :mod:`lesa.data.coco`; also a file without categories or (``train``)
            annotated images.
        BadImageError: an image file that is not an image, or too large.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, train: bool = False, flip: float = 0.5,
                 semantic: Optional[str | Path] = None, *, categories: Optional[list[dict[str, Any]]] = None,
                 semantic_classes: Optional[int] = None, max_repaired: float = MAX_REPAIRED):
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        if not self.annotation_file.is_file():
            raise NotFoundError(f"annotation file {str(self.annotation_file)!r} does not exist")
        if not self.image_dir.is_dir():
            raise NotFoundError(f"image folder {str(self.image_dir)!r} does not exist")
        self.semantic = semantic if semantic in (None, INSTANCE_SEMANTIC) else Path(semantic)
        if isinstance(self.semantic, Path) and not self.semantic.is_dir():
            raise NotFoundError(f"semantic map folder {str(self.semantic)!r} does not exist (COCO-stuff's "
                                "stuffthingmaps/<split>2017, one PNG per image)")
        self.train, self.flip = train, flip
        self._load(categories, max_repaired)
        if self.semantic == INSTANCE_SEMANTIC and not self.has_masks:
            raise DataError(f"{self.annotation_file} is box-only: semantic maps cannot be drawn from its instance "
                            "masks; pass a folder of maps, or train without the semantic branch")
        if not self.categories:
            raise DataError(f"{self.annotation_file} has no categories")
        self.category_ids = [c["id"] for c in self.categories]
        self.classes = [c["name"] for c in self.categories]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.semantic_classes = semantic_class_count(self.semantic, len(self.classes), semantic_classes)
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(not a["iscrowd"] for a in self.coco.imgToAnns.get(i, []))]
        if not ids:
            raise DataError(f"{self.annotation_file} has no {'annotated ' if train else ''}images")
        self.ids = ids
        self.semantic_files = self._semantic_files() if isinstance(self.semantic, Path) else {}

    def _semantic_files(self) -> dict[int, Path]:
        """``{image id: map}`` of the images read (see :meth:`semantic_map`), each checked to exist (not decoded).

        Raises:
            DataError: maps missing, or two images whose maps would be one file.
        """
        files = {i: self.semantic / Path(self.coco.imgs[i]["file_name"]).with_suffix(".png") for i in self.ids}
        first: dict[Path, int] = {}
        for image_id, file in files.items():
            other = first.setdefault(file, image_id)
            if other != image_id:
                names = [self.coco.imgs[i]["file_name"] for i in (other, image_id)]
                raise DataError(f"{self.annotation_file}: images {other} ({names[0]!r}) and {image_id} ({names[1]!r}) "
                                f"would read the same semantic map {file} (a map is named by its image's path with "
                                ".png); give the images distinct names")
        missing = [i for i, file in files.items() if not file.is_file()]
        if missing:
            info = self.coco.imgs[missing[0]]
            raise DataError(f"{self.annotation_file}: {len(missing)} of {len(files)} semantic map(s) are missing from "
                            f"{self.semantic} (e.g. image {info['id']} ({info['file_name']!r}): "
                            f"{files[missing[0]]}); each image's map is its path relative to {self.image_dir} "
                            "with .png, in that folder: add them, or train without the semantic branch")
        return files

    def _load(self, categories: Optional[list[dict[str, Any]]], max_repaired: float) -> None:
        """Validate, map the categories, check the image files, repair; sets ``categories``, ``coco``,
        ``has_masks``, ``stored``, ``repairs``, ``summary``."""
        from pycocotools.coco import COCO

        path = self.annotation_file
        data = read_coco_file(path)
        check_references(data, path)
        annotations = data.get("annotations", [])
        self.categories, self.ignored_categories = run_categories(
            data["categories"], categories, path, used={ann["category_id"] for ann in annotations})
        self.has_masks = has_masks(annotations, path)
        if not self.has_masks:  # null or [] in every annotation: as if the key were not there
            for ann in annotations:
                ann.pop("segmentation", None)
        self.stored = check_image_files(data["images"], self.image_dir, path)
        images = {info["id"]: info for info in data["images"]}
        self.repairs = Repairs()
        cleaned = [clean_annotation(ann, images[ann["image_id"]], path, self.repairs) for ann in annotations]
        self.repairs.check(len(annotations), path, max_repaired)
        data["annotations"] = [ann for ann in cleaned if ann is not None]
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.summary = self._summary(len(annotations))

    def _summary(self, total: int) -> str:
        data = self.coco.dataset
        parts = [f"{len(data['images'])} images, {total} annotations ({'masks' if self.has_masks else 'box-only'}), "
                 f"{len(data['categories'])} categories"]
        if self.repairs.annotations:
            parts.append(f"repaired: {self.repairs.text()} ({len(self.repairs.annotations)} annotations)")
        if self.stored:
            parts.append(f"{len(self.stored)} image(s) read as stored, without their EXIF rotation (their JSON size "
                         "is the stored one)")
        if self.ignored_categories:
            shown = ", ".join(f"{c['id']} {c['name']!r}" for c in self.ignored_categories[:5])
            parts.append(f"ignored {len(self.ignored_categories)} category(ies) that the run does not know and no "
                         f"annotation uses ({shown}{', ...' if len(self.ignored_categories) > 5 else ''})")
        return f"{self.annotation_file}: " + "; ".join(parts)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Optional[tuple[Tensor, dict[str, Tensor]]]:
        """``(image, target)``, or ``None`` for an image that cannot be decoded (a warning names it; the collate
        functions skip it: training counts it against ``--max-bad-fraction``, evaluation leaves it out of AP and
        reports it)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        try:
            image = pil_to_tensor(self.read_image(info)).float() / 255.0
        except BadImageError as err:
            warnings.warn(f"skipped: {err}", stacklevel=2)
            return None
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not (self.train and a["iscrowd"])]
        target = self.target(image_id, anns, info)
        if self.semantic is not None:
            target["semantic"] = self.semantic_map(info, target)
        if self.train and random.random() < self.flip:
            image, target = hflip(image, target)
        return image, target

    def read_image(self, info: dict[str, Any]) -> Image.Image:
        """The image as annotated: upright, or as stored where the JSON's size says so.

        Raises:
            DataError: the decoded size differs from the JSON's (a file changed since loading, or an EXIF
                orientation that only decoding reveals, such as a PNG's after its pixels).
        """
        image = read_image(self.image_dir / info["file_name"])
        if info["id"] in self.stored:
            image = image.transpose(UNDO_ORIENTATION[self.stored[info["id"]]])
        if image.size != (info["width"], info["height"]):
            raise DataError(f"{self.annotation_file}: image {info['id']} ({self.image_dir / info['file_name']}) "
                            f"reads as {image.size[0]}x{image.size[1]} but is {info['width']}x{info['height']} in "
                            "the JSON (width x height); fix width/height there, or use the image that was annotated")
        return image

    def target(self, image_id: int, anns: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Tensor]:
        """Boxes (xyxy), labels, masks (unless box-only), image id, areas and crowd flags of one image."""
        height, width = info["height"], info["width"]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        target = dict(
            boxes=boxes.reshape(-1, 4),
            labels=torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            image_id=torch.tensor(image_id),
            area=torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            iscrowd=torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
        )
        if self.has_masks:
            masks = [torch.from_numpy(annotation_mask(a, height, width)) for a in anns]
            target["masks"] = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        return target

    def semantic_map(self, info: dict[str, Any], target: dict[str, Tensor]) -> Tensor:
        """The ``(H, W)`` int64 class map of an image for HTC's semantic branch: from COCO-stuff's PNG in
        the semantic folder, or (``semantic='instances'``) 0 on background and each object's label on its
        mask (the digit scenes: digit + 1 on the strokes).

        Raises:
            NotFoundError: the image's map is missing.
            DataError: a map with several channels, of another size than its image, or with a label outside
                ``[0, semantic_classes)`` other than 255.
        """
        if self.semantic == INSTANCE_SEMANTIC:
            semantic = torch.zeros((info["height"], info["width"]), dtype=torch.int64)
            for label, mask in zip(target["labels"], target["masks"]):
                semantic[mask.bool()] = label
            name = f"the semantic map drawn from {self.annotation_file}'s masks (image {info['id']})"
        else:
            path = self.semantic_files[info["id"]]
            if not path.is_file():
                raise NotFoundError(f"semantic map {path} is missing (one PNG per image of {self.image_dir})")
            semantic = torch.from_numpy(read_label_map(path))
            if tuple(semantic.shape) != (info["height"], info["width"]):
                raise DataError(f"semantic map {path} is {semantic.shape[1]}x{semantic.shape[0]} but its image "
                                f"{info['file_name']} is {info['width']}x{info['height']}; a map has its image's size")
            name = f"semantic map {path}"
        self.check_labels(semantic.unique().tolist(), name)
        return semantic

    def check_labels(self, labels: Iterable[int], name: str) -> None:
        """Raises DataError for a label outside ``[0, semantic_classes)`` other than 255 (ignored)."""
        bad = [label for label in labels if not 0 <= label < self.semantic_classes and label != IGNORE_LABEL]
        if bad:
            raise DataError(f"{name} has label {bad[0]}, outside [0, {self.semantic_classes}) and not {IGNORE_LABEL} "
                            f"(ignored); pass --semantic-classes {max(bad) + 1} (or more), or fix the map")


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


def hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    for key in ("masks", "semantic"):
        if key in target:
            target[key] = target[key].flip(-1)
    return image.flip(-1), target


def collate_detection(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images and targets as lists (sizes differ), the undecodable samples (``None``) left out."""
    good = [sample for sample in batch if sample is not None]
    return [image for image, _ in good], [target for _, target in good]


def collate_training(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]], int]:
    """:func:`collate_detection`, and the number of samples it left out."""
    images, targets = collate_detection(batch)
    return images, targets, len(batch) - len(images)
