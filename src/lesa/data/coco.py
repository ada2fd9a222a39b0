"""COCO-format detection and instance segmentation data: validation, reading (polygon and RLE masks, or boxes
only), writing, and results.

A dataset is an annotation JSON in COCO's format plus an image folder. Category ids (COCO's run 1..90 with
gaps) map to contiguous labels ``1..K`` (0 is torchvision's background). A run has one mapping, taken from
its training file; every other file (validation, ``det eval --data``) is read through it
(``categories=``), so predictions go back out with the run's ids and names.

Policies of :class:`CocoDetection`, the same for every file it loads (training, validation, evaluation):

* **Schema.** The whole file is validated when loaded, by :data:`COCO_SCHEMA` (pydantic, strict, as
  :mod:`lesa.options`): a JSON mapping with ``images`` (``id``, ``file_name``, ``width``, ``height``),
  ``categories`` (``id``, ``name``) and ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` =
  ``[x, y, width, height]``; optional ``segmentation``, ``area``, ``iscrowd``). Ids are whole numbers, boxes
  four finite numbers (numbers written as text are refused), sizes positive. Image, annotation and category
  ids are unique, category names too, and every reference resolves. Other keys (``licenses``,
  ``supercategory``, ...) are ignored. The first problem is one :class:`DataError` naming the file, the
  entry (``annotation 12 (image 3)``) and the fix. Validating and repairing cost about as much time again
  as parsing the JSON (a 48 MB file of 86k polygon annotations: 6.6 s to parse, 6.5 s to validate, 1-3 s
  to check and repair, on a busy 2-core machine).
* **Masks.** ``segmentation`` is optional: a file where no annotation has one (no key, or ``null`` or ``[]``,
  as many VOC / YOLO converters write) is box-only (``has_masks`` is False and targets carry no ``masks``);
  a file where some annotations have one and others not is refused. Polygons with fewer than 3 points (6
  numbers; COCO itself has a few) are dropped and counted; so are polygons with no area inside their image
  and polygons with a coordinate beyond :data:`MAX_COORDINATE`; a polygon reaching more than 1 pixel out of
  its image is clipped to it (exactly: not counted), so pycocotools never rasterises far outside (a
  coordinate of 1e9 crashed it). An annotation left without a polygon is dropped with them. An RLE mask
  must have its image's size and cover it exactly: a compressed one (``counts`` a string) is decoded to its
  run lengths when loaded (:func:`rle_counts`), so that a malformed or short one is an error naming the
  annotation, not a crash or uninitialised memory in training.
* **Boxes.** Clipped to the image: an overshoot of up to 1 pixel (rounding) silently, a larger one is
  counted; a box wholly outside the image, or narrower or lower than 1 pixel after clipping, is dropped
  with its annotation and counted. Dropped annotations are gone from the ground truth of evaluation too.
  When more than ``max_repaired`` (:data:`MAX_REPAIRED`, 1%; ``lesa det train --max-repaired``) of a file's
  annotations needed any of these repairs (boxes, polygons), the file is refused instead: that many suggests
  boxes in other units or images that are not the annotated ones.
  A missing ``area`` (or ``0``, as some exporters write) is the (clipped) box's.
* **Image sizes.** Every image's header (size and EXIF orientation, no pixels decoded) is read up front, 8
  files at a time: about 0.1-0.2 ms an image from a warm page cache (20 s for COCO's 118k training
  images), more from a cold disk or network storage. The JSON's width/height must match: the upright size
  (EXIF orientation applied, as :func:`lesa.data.images.read_image` reads it and as labelling tools draw
  on it) is used as is; when only the stored size matches, the annotations were drawn on the stored pixels
  and the image is read without its EXIF rotation (counted); when neither matches, :class:`DataError`
  names the image and both sizes. Where the two sizes are equal (flips, 180°, square images) the image is
  read upright. A file PIL cannot identify, or one over the reader's pixel limit, stops the load with
  :class:`BadImageError` naming it; each decoded image's size is checked again when it is read (a file
  truncated after its header is found then, not when loading). ``file_name`` is relative to the image
  folder: a missing file is named with that folder and, where one exists, the spelling that finds it (a
  ``train/`` prefix to strip, ``/`` for ``\\``); a ``file_name`` that is a folder is said to be one.
* **Categories.** Read through the run's mapping (``categories=``): a category the run does not know that an
  annotation uses is refused; one that no annotation uses is ignored and said in the summary.
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
import json
import random
import warnings
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, with_config
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor
from typing_extensions import NotRequired, TypedDict

from ..errors import BadImageError, DataError, NotFoundError
from ..options import Name, NonNegativeFloat, NonNegativeInt, PositiveInt, describe
from .images import DECODE_ERRORS, read_image, read_label_map

MAX_REPAIRED = 0.01  # share of a file's annotations that may be repaired (clipped or dropped) before it is refused
CLIP_TOLERANCE = 1.0  # pixels a box may overshoot its image without being counted (rounding in converters)
MIN_BOX_SIDE = 1.0  # pixels; a thinner box after clipping is empty
MAX_COORDINATE = 1e12  # pixels; a polygon coordinate beyond is a unit or parsing error (and clips imprecisely)
INSTANCE_SEMANTIC = "instances"
COCO_STUFF_CLASSES = 183  # COCO-stuff's stuffthingmaps: 182 labels and 0, 255 unlabeled (mmdetection's HTC)
IGNORE_LABEL = 255  # a semantic map's "unlabeled"
HEADER_THREADS = 8  # header reads wait on storage more than on the CPU
EXIF_ORIENTATION = 0x0112
# How to get the stored pixels back from read_image's upright image, for the orientations that swap the sides
UNDO_ORIENTATION = {5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                    8: Image.Transpose.ROTATE_270}


# -- the schema ----------------------------------------------------------------------------------------------
# Strict as the options (a float field takes an int, never text); keys lesa does not use are ignored
COCO_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


@with_config(COCO_CONFIG)
class CocoImage(TypedDict):
    id: int
    file_name: Name
    width: PositiveInt
    height: PositiveInt


@with_config(COCO_CONFIG)
class CocoCategory(TypedDict):
    id: int
    name: Name


@with_config(COCO_CONFIG)
class CocoRle(TypedDict):
    size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]  # [height, width]
    counts: Union[str, list[NonNegativeInt]]  # compressed, or uncompressed run lengths


Polygons = list[list[float]]
Segmentation = Annotated[Union[Annotated[Polygons, Tag("polygons")], Annotated[CocoRle, Tag("rle")]],
                         Discriminator(lambda value: "rle" if isinstance(value, dict) else "polygons")]


@with_config(COCO_CONFIG)
class CocoAnnotation(TypedDict):
    id: int
    image_id: int
    category_id: int
    bbox: Annotated[list[float], Field(min_length=4, max_length=4)]
    segmentation: NotRequired[Optional[Segmentation]]  # null or [] in every annotation: box-only
    area: NotRequired[NonNegativeFloat]
    iscrowd: NotRequired[Literal[0, 1]]


@with_config(COCO_CONFIG)
class CocoFile(TypedDict):
    images: list[CocoImage]
    categories: list[CocoCategory]
    annotations: NotRequired[list[CocoAnnotation]]  # image-info files (test sets) have none


COCO_SCHEMA = TypeAdapter(CocoFile)
REQUIRED = {"images": "every image needs id, file_name, width and height",
            "annotations": "every annotation needs id, image_id, category_id and bbox [x, y, width, height]",
            "categories": "every category needs id and name"}
SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}
FIELD_HINTS = {"bbox": " (bbox is [x, y, width, height] in pixels: four numbers, not text)",
               "segmentation": " (segmentation is a list of polygons [[x1, y1, x2, y2, ...], ...] or an RLE mask "
                               "{'size': [height, width], 'counts': ...})"}
UNION_TAGS = {"polygons", "rle", "str", "list[int]"}


def read_coco_file(path: Path) -> dict[str, Any]:
    """The validated contents of a COCO annotation file (only the keys of :data:`COCO_SCHEMA`).

    Raises:
        DataError: not JSON, not a mapping, or an entry that breaks the schema (naming the entry and the fix).
    """
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a JSON file ({err}); expected COCO's JSON with 'images', 'annotations' "
                        "and 'categories'") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level is a {type(data).__name__}, not a mapping; a COCO annotation file "
                        "is a JSON object with 'images', 'annotations' and 'categories' (a list of detections "
                        "is a results file)")
    try:
        return COCO_SCHEMA.validate_python(data)
    except ValidationError as err:
        more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
        raise DataError(f"{path}: {schema_problem(data, err.errors()[0])}{more}") from None


def schema_problem(data: dict[str, Any], error: dict[str, Any]) -> str:
    """One schema error as ``ENTRY: FIELD: got VALUE; FIX``, the entry named by its id."""
    loc = [part for part in error["loc"] if part not in UNION_TAGS]
    section = str(loc[0])
    if len(loc) == 1:
        if error["type"] == "missing":
            return f"there is no '{section}'; a COCO annotation file has 'images', 'annotations' and 'categories'"
        return f"'{section}' must be a list; got {type(error['input']).__name__}"
    entry = data[section][loc[1]]
    where = entry_name(section, entry, loc[1])
    if len(loc) == 2:
        return f"{where} is not a mapping (got {entry!r:.60}); {REQUIRED[section]}"
    hint = FIELD_HINTS.get(str(loc[2]), "")
    if error["type"] == "missing" and len(loc) == 3:
        return f"{where} has no '{loc[2]}'; {REQUIRED[section]}"
    if error["type"] == "missing":
        parent = str(loc[2]) + "".join(f"[{part}]" for part in loc[3:-1])
        return f"{where}: {parent} has no '{loc[-1]}'{hint}"
    return f"{where}: {describe(dict(error, loc=tuple(loc[2:])), {})}{hint}"


def entry_name(section: str, entry: Any, index: int) -> str:
    """``image 3``, ``annotation 12 (image 3)``, ``category 7``, or the position where there is no id."""
    singular = SINGULAR[section]
    if not isinstance(entry, dict) or "id" not in entry:
        return f"{singular} #{index} (counting from 0)"
    if section == "annotations":
        return f"annotation {entry['id']!r} (image {entry.get('image_id')!r})"
    return f"{singular} {entry['id']!r}"


def check_references(data: dict[str, Any], path: Path) -> None:
    """Unique ids and category names; every annotation's image and category exist.

    Raises:
        DataError: a duplicate, or a reference to an id that is not there.
    """
    for section in ("images", "annotations", "categories"):
        _check_unique([entry["id"] for entry in data.get(section, [])], f"{SINGULAR[section]} id", path)
    _check_unique([c["name"] for c in data["categories"]], "category name", path)
    images, categories = {i["id"] for i in data["images"]}, {c["id"] for c in data["categories"]}
    for ann in data.get("annotations", []):
        where = f"{path}: annotation {ann['id']} (image {ann['image_id']})"
        if ann["category_id"] not in categories:
            raise DataError(f"{where} has category_id {ann['category_id']!r}, which is not among the categories "
                            f"{sorted(categories)[:20]}; fix the id or add the category")
        if ann["image_id"] not in images:
            raise DataError(f"{where} refers to an image id that is not in 'images'; fix the image_id")


def _check_unique(values: list[Any], what: str, path: Path) -> None:
    repeated = [value for value, n in Counter(values).items() if n > 1]
    if repeated:
        raise DataError(f"{path}: {what} {repeated[0]!r} is used more than once ({len(repeated)} such); "
                        f"each {what} must be unique")


def without_mask(ann: dict[str, Any]) -> bool:
    """No ``segmentation``, or an empty one (``null``, ``[]``: what many VOC / YOLO converters write)."""
    return ann.get("segmentation") in (None, [])


def has_masks(annotations: list[dict[str, Any]], path: Path) -> bool:
    """Whether the annotations carry masks: all of them (True) or none (False, box-only). An annotation
    without a ``segmentation`` key, or with ``null`` or ``[]`` there, has none.

    Raises:
        DataError: some have a mask and others not.
    """
    without = [ann for ann in annotations if without_mask(ann)]
    if without and len(without) < len(annotations):
        example = without[0]
        shown = f"segmentation {json.dumps(example['segmentation'])}" if "segmentation" in example else "no such key"
        raise DataError(f"{path}: {len(without)} of {len(annotations)} annotations have no 'segmentation' (or an "
                        f"empty one: null or []; e.g. annotation {example['id']} (image {example['image_id']}): "
                        f"{shown}) while the others have masks; give every annotation a mask, or none (box-only "
                        "data)")
    return bool(annotations) and not without


# -- repairs ------------------------------------------------------------------------------------------------
REPAIR_NAMES = {
    "polygons_dropped": "polygon(s) with fewer than 3 points dropped",
    "polygons_outside": "polygon(s) wholly outside their image dropped",
    "polygons_absurd": f"polygon(s) with a coordinate beyond {MAX_COORDINATE:g} pixels dropped",
    "no_polygon_left": "annotation(s) left without a polygon dropped",
    "boxes_clipped": "box(es) clipped to their image",
    "boxes_outside": "box(es) wholly outside their image dropped",
    "boxes_empty": "box(es) thinner than 1 pixel dropped",
}


@dataclass
class Repairs:
    """What loading repaired: counts by kind, one example each, and the annotations concerned."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    annotations: set[int] = field(default_factory=set)

    def add(self, kind: str, ann: dict[str, Any], detail: str, n: int = 1) -> None:
        self.counts[kind] += n
        self.examples.setdefault(kind, f"annotation {ann['id']} (image {ann['image_id']}): {detail}")
        self.annotations.add(ann["id"])

    def text(self) -> str:
        return ", ".join(f"{self.counts[k]} {name}" for k, name in REPAIR_NAMES.items() if self.counts[k])

    def check(self, total: int, path: Path, limit: float) -> None:
        """Raises DataError when more than ``limit`` of ``total`` annotations were repaired."""
        if len(self.annotations) <= limit * total:
            return
        kind = next(k for k in REPAIR_NAMES if self.counts[k])
        raise DataError(f"{path}: {len(self.annotations)} of {total} annotations ({len(self.annotations) / total:.1%}) "
                        f"needed repair ({self.text()}; e.g. {self.examples[kind]}), more than the "
                        f"{limit * 100:g}% allowed: boxes in other units, or images that are not the annotated "
                        "ones? Fix the file, or allow more with --max-repaired FRACTION (lesa det train; "
                        "max_repaired= in the API)")


def clean_annotation(ann: dict[str, Any], image: dict[str, Any], path: Path, repairs: Repairs) -> Optional[dict]:
    """``ann`` with its box clipped, its polygons clipped to the image (degenerate ones and those outside
    dropped) and ``area`` and ``iscrowd`` filled in; ``None`` when it is dropped (counted in ``repairs``).

    Raises:
        DataError: a negative box side, a polygon with an odd number of coordinates, or an RLE mask that is not
            valid or not the image's size.
    """
    box = clip_box(ann, image, path, repairs)
    if box is None:
        return None
    ann = dict(ann, bbox=box, iscrowd=ann.get("iscrowd", 0))
    if not ann.get("area"):  # missing, or 0 as some exporters write: pycocotools would count every object as small
        ann["area"] = box[2] * box[3]
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        check_rle(segmentation, image, path, ann)
    elif segmentation is not None:
        polygons = check_polygons(segmentation, image, path, ann, repairs)
        if not polygons:
            repairs.add("no_polygon_left", ann, "no polygon of 3 points or more inside the image")
            return None
        ann["segmentation"] = polygons
    return ann


def where(path: Path, ann: dict[str, Any]) -> str:
    return f"{path}: annotation {ann['id']} (image {ann['image_id']})"


def clip_box(ann: dict[str, Any], image: dict[str, Any], path: Path, repairs: Repairs) -> Optional[list[float]]:
    """The annotation's ``[x, y, w, h]`` clipped to its image, or ``None`` if nothing of at least 1 pixel is left
    (counted in ``repairs``). Raises DataError for a negative width or height."""
    x, y, w, h = ann["bbox"]
    if w < 0 or h < 0:
        raise DataError(f"{where(path, ann)} has bbox {ann['bbox']} with a negative width or height; bbox is "
                        "[x, y, width, height] (not [x1, y1, x2, y2])")
    width, height = image["width"], image["height"]
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        kind = "boxes_outside"
    elif x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
        kind = "boxes_empty"
    elif max(-x, -y, x + w - width, y + h - height) > CLIP_TOLERANCE:
        kind = "boxes_clipped"
    else:
        return [x1, y1, x2 - x1, y2 - y1]
    repairs.add(kind, ann, f"bbox {ann['bbox']} on a {width}x{height} image")
    return [x1, y1, x2 - x1, y2 - y1] if kind == "boxes_clipped" else None


def check_polygons(polygons: list[list[float]], image: dict[str, Any], path: Path, ann: dict[str, Any],
                   repairs: Repairs) -> list[list[float]]:
    """The polygons with at least 3 points, clipped to the image; those with fewer points, with no area inside
    the image or with a coordinate beyond :data:`MAX_COORDINATE` dropped and counted.

    Clipping is exact (Sutherland-Hodgman against the image rectangle), so it is not counted: the mask keeps its
    pixels up to pycocotools' rasterisation along the border (a pixel or two); it keeps pycocotools from
    rasterising coordinates far outside the image (1e9 crashes it, -1e12 exhausts the memory).

    Raises:
        DataError: a polygon with an odd number of coordinates.
    """
    width, height = image["width"], image["height"]
    kept = []
    for i, polygon in enumerate(polygons):
        if len(polygon) % 2:
            raise DataError(f"{where(path, ann)}: polygon {i} has {len(polygon)} numbers, an odd count; a polygon "
                            "is [x1, y1, x2, y2, ...]")
        if len(polygon) < 6:
            repairs.add("polygons_dropped", ann, f"a polygon of {len(polygon) // 2} point(s)")
            continue
        xs, ys = polygon[0::2], polygon[1::2]
        if max(map(abs, polygon)) > MAX_COORDINATE:
            repairs.add("polygons_absurd", ann, f"polygon {i} has coordinate {max(polygon, key=abs):g}")
            continue
        clipped = clip_polygon(polygon, width, height)
        if clipped is None:
            repairs.add("polygons_outside", ann, f"polygon {i} spans x {min(xs):g}..{max(xs):g}, y {min(ys):g}.."
                                                 f"{max(ys):g} on a {width}x{height} image")
            continue
        kept.append(clipped)
    return kept


def clip_polygon(polygon: list[float], width: float, height: float) -> Optional[list[float]]:
    """``[x1, y1, x2, y2, ...]`` clipped to ``[0, width] x [0, height]``; None when nothing of it with an area is
    left. A polygon within :data:`CLIP_TOLERANCE` of the image is returned as it is (COCO's own overshoot by
    rounding: its ground truth stays pycocotools')."""
    xs, ys = polygon[0::2], polygon[1::2]
    if min(xs) >= width or max(xs) <= 0 or min(ys) >= height or max(ys) <= 0:
        return None
    tol = CLIP_TOLERANCE
    if min(xs) >= -tol and min(ys) >= -tol and max(xs) <= width + tol and max(ys) <= height + tol:
        return polygon
    points = list(zip(xs, ys))
    for axis, bound, upper in ((0, 0.0, False), (0, float(width), True), (1, 0.0, False), (1, float(height), True)):
        points = clip_half_plane(points, axis, bound, upper)
        if len(points) < 3:
            return None
    area = sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]))
    return [c for point in points for c in point] if area else None


def clip_half_plane(points: list[tuple[float, float]], axis: int, bound: float, upper: bool
                    ) -> list[tuple[float, float]]:
    """One Sutherland-Hodgman step: the part of a closed polygon where ``point[axis] <= bound`` (``upper``) or
    ``>= bound``."""
    def inside(point: tuple[float, float]) -> bool:
        return point[axis] <= bound if upper else point[axis] >= bound

    def crossing(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        t = (bound - a[axis]) / (b[axis] - a[axis])
        other = a[1 - axis] + t * (b[1 - axis] - a[1 - axis])
        return (bound, other) if axis == 0 else (other, bound)

    out = []
    for previous, point in zip(points[-1:] + points[:-1], points):
        if inside(point):
            if not inside(previous):
                out.append(crossing(previous, point))
            out.append(point)
        elif inside(previous):
            out.append(crossing(previous, point))
    return out


def check_rle(rle: dict[str, Any], image: dict[str, Any], path: Path, ann: dict[str, Any]) -> None:
    """Raises DataError when the RLE mask is not the image's size, or its run lengths (uncompressed, or decoded
    from COCO's compressed string) are not valid or do not cover the image exactly: pycocotools refuses too many
    pixels only when it decodes (in training) and leaves too few as uninitialised memory."""
    size = [image["height"], image["width"]]
    if rle["size"] != size:
        raise DataError(f"{where(path, ann)}: its RLE mask has size {rle['size']} (height, width) but the image is "
                        f"{size[0]}x{size[1]} (height x width); encode the mask at the image's size")
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            counts = rle_counts(counts)
        except ValueError as err:
            raise DataError(f"{where(path, ann)}: its RLE counts {counts!r:.40} are not COCO's compressed RLE "
                            f"({err}); re-encode the mask (pycocotools.mask.encode)") from None
    if sum(counts) != size[0] * size[1]:
        kind = "compressed RLE decodes to" if isinstance(rle["counts"], str) else "RLE run lengths add up to"
        raise DataError(f"{where(path, ann)}: its {kind} {sum(counts)} pixels, not the image's {size[0]} x "
                        f"{size[1]} = {size[0] * size[1]}; re-encode the mask")


def rle_counts(text: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``: 5 bits a character from
    '0', a continuation bit, the sign on the last; from the third run on, each is stored as the difference to the
    run two before it).

    Raises:
        ValueError: a character outside '0'..'o', a string that ends inside a number, or a negative run.
    """
    counts: list[int] = []
    value = shift = 0
    for char in text:
        code = ord(char) - 48
        if not 0 <= code < 64:
            raise ValueError(f"character {char!r} is outside '0'..'o'")
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise ValueError(f"run {len(counts)} is negative ({value})")
        counts.append(value)
        value = shift = 0
    if shift:
        raise ValueError("it ends inside a number")
    return counts


# -- image files --------------------------------------------------------------------------------------------
def image_header(path: Path) -> tuple[tuple[int, int], int]:
    """The stored ``(width, height)`` and EXIF orientation (1 if none) of an image, from its header only.

    Raises:
        BadImageError: PIL cannot identify the file, or it has more pixels than PIL.Image.MAX_IMAGE_PIXELS
            (read_image's limit).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # lesa's limit is checked below
            with Image.open(path) as image:
                # Image.getexif, not a plugin's: PNG's would decode the pixels to look past them
                orientation = Image.Image.getexif(image).get(EXIF_ORIENTATION, 1)
                size = image.size
    except Image.DecompressionBombError:  # over twice the limit: PIL refuses before telling the size
        raise BadImageError(str(path), too_many_pixels("more than twice as many pixels")) from None
    except UnidentifiedImageError:
        raise BadImageError(str(path), "PIL cannot identify it as an image") from None
    except DECODE_ERRORS as err:
        raise BadImageError(str(path), f"{type(err).__name__}: {err}") from None
    if Image.MAX_IMAGE_PIXELS and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        raise BadImageError(str(path), too_many_pixels(f"{size[0] * size[1]:,} pixels, more"))
    return size, orientation if orientation in range(1, 9) else 1


def too_many_pixels(count: str) -> str:
    return (f"{count} than PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,} (read_image's guard against "
            "decompression bombs); downscale it")


def check_image_files(images: list[dict[str, Any]], image_dir: Path, path: Path) -> dict[int, int]:
    """Compare every image's header with its JSON size (see the module's policies); returns ``{image id:
    EXIF orientation}`` of the images to read as stored, without their rotation.

    Raises:
        DataError: image files missing, or a file whose size matches the JSON neither upright nor as stored.
        BadImageError: a file that is not an image, or too large.
    """
    files = [image_dir / info["file_name"] for info in images]
    missing = [(info, file) for info, file in zip(images, files) if not file.is_file()]
    if missing:
        raise DataError(f"{path}: {missing_files(missing, image_dir)}")
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        headers = list(pool.map(image_header, files))
    stored = {}
    for info, file, (size, orientation) in zip(images, files, headers):
        upright = size[::-1] if orientation in UNDO_ORIENTATION else size
        expected = (info["width"], info["height"])
        if expected == upright:
            continue
        if expected != size:
            turned = f" ({upright[0]}x{upright[1]} upright, by its EXIF orientation)" if upright != size else ""
            raise DataError(f"{path}: image {info['id']} ({file}) is {size[0]}x{size[1]}{turned} but "
                            f"{expected[0]}x{expected[1]} in the JSON (width x height); fix width/height there, "
                            "or use the image that was annotated")
        stored[info["id"]] = orientation
    return stored


def missing_files(missing: list[tuple[dict[str, Any], Path]], image_dir: Path) -> str:
    """What is wrong with the first of the image files that are not there: a folder, or a name that is not
    relative to the image folder (with the name that would find it)."""
    info, file = missing[0]
    name = info["file_name"]
    if file.is_dir():
        return (f"image {info['id']}: file_name {name!r} is a folder in {image_dir}, not an image file ({len(missing)} "
                "image file(s) not found); file_name names the image file, relative to that folder")
    found = found_as(name, image_dir)
    hint = f"; {found!r} exists there: {fix_hint(name, found)}" if found else ""
    return (f"{len(missing)} image file(s) listed there are missing from {image_dir} (e.g. image {info['id']}: "
            f"{name!r}); file_names are relative to that image folder{hint}; otherwise copy the files there or "
            "remove them from the annotations")


def found_as(name: str, image_dir: Path) -> Optional[str]:
    """The spelling of ``name`` that exists in ``image_dir``: with '/' for '\\', without leading folders."""
    parts = [part for part in name.replace("\\", "/").split("/") if part]
    for start in range(len(parts)):
        candidate = "/".join(parts[start:])
        if candidate != name and (image_dir / candidate).is_file():
            return candidate
    return None


def fix_hint(name: str, found: str) -> str:
    posix = name.replace("\\", "/")
    steps = ["write '/' for '\\'"] if posix != name else []
    if posix != found:
        steps.append(f"strip the prefix {posix[: len(posix) - len(found)]!r}")
    return " and ".join(steps) + " in every file_name (or pass the image folder that file_names start from)"


# -- categories ---------------------------------------------------------------------------------------------
def run_categories(file_categories: list[dict[str, Any]], run: Optional[list[dict[str, Any]]], path: Path,
                   used: Optional[set[int]] = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's categories (``[{id, name}]`` by id) and the file's categories that are ignored: the file's own
    when ``run`` is None (a training file), else ``run``, which must know by id and name each of the file's
    categories that an annotation uses (``used``: their ids; default: all). The file may list a subset, in any
    order; a category the run does not know and no annotation uses is ignored (returned second).

    Raises:
        DataError: a category of the file that an annotation uses and the run does not have.
    """
    if run is None:
        return sorted(({"id": c["id"], "name": c["name"]} for c in file_categories), key=lambda c: c["id"]), []
    names = {c["id"]: c["name"] for c in run}
    ignored = []
    for category in file_categories:
        cid, name = category["id"], category["name"]
        if names.get(cid) == name:
            continue
        if used is not None and cid not in used:
            ignored.append({"id": cid, "name": name})
            continue
        if cid in names:
            problem = f"category {cid} is {name!r} there but {names[cid]!r} in the run"
        else:
            ids = [i for i, n in names.items() if n == name]
            problem = f"category {cid} {name!r} is not one of the run's" + (f" (it has {name!r} as id {ids[0]})"
                                                                            if ids else "")
        raise DataError(f"{path}: {problem}; the run was trained on {len(run)} categories "
                        f"({', '.join(f'{i} {n!r}' for i, n in list(names.items())[:10])}"
                        f"{', ...' if len(run) > 10 else ''}): use those ids and names, or train on this file")
    return list(run), ignored


def semantic_class_count(semantic: Optional[str | Path], num_classes: int, given: Optional[int] = None) -> int:
    """HTC's semantic classes: ``given``, else the instance labels and background for maps drawn from the
    instances, else COCO-stuff's 183."""
    return given or (num_classes + 1 if semantic == INSTANCE_SEMANTIC else COCO_STUFF_CLASSES)


# -- the dataset --------------------------------------------------------------------------------------------
class CocoDetection(Dataset):
    """Images and detection targets (``boxes`` xyxy, ``labels``, ``masks`` unless box-only, ``image_id``, ...)
    of a COCO file, validated and repaired when loaded (see the module's policies).

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
        DataError: see the module's policies; also a file without categories or (``train``) annotated images.
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


def write_coco(path: str | Path, images: list[dict], annotations: list[dict], categories: list[dict],
               info: Optional[dict] = None) -> None:
    """Write a COCO annotation file (``images``, ``annotations``, ``categories``)."""
    from ..utils import atomic_write

    data = dict(info=info or {}, images=images, annotations=annotations, categories=categories)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
