"""What loading a COCO file repairs in its annotations (:func:`clean_annotation`), counted in :class:`Repairs`,
and when that many repairs refuse the file.

* **Masks.** Polygons with fewer than 3 points (6 numbers; COCO itself has a few) are dropped and counted; so
  are polygons with no area inside their image and polygons with a coordinate beyond :data:`MAX_COORDINATE`;
  a polygon reaching more than 1 pixel out of its image is clipped to it (exactly: not counted), so
  pycocotools never rasterises far outside (a coordinate of 1e9 crashed it). An annotation left without a
  polygon is dropped with them. An RLE mask must have its image's size and cover it exactly: a compressed one
  (``counts`` a string) is decoded to its run lengths when loaded (:func:`rle_counts`), so that a malformed or
  short one is an error naming the annotation, not a crash or uninitialised memory in training.
* **Boxes.** Clipped to the image: an overshoot of up to 1 pixel (rounding) silently, a larger one is
  counted; a box wholly outside the image, or narrower or lower than 1 pixel after clipping, is dropped
  with its annotation and counted. Dropped annotations are gone from the ground truth of evaluation too.
  When more than ``max_repaired`` (:data:`MAX_REPAIRED`, 1%; ``lesa det train --max-repaired``) of a file's
  annotations needed any of these repairs (boxes, polygons), the file is refused instead: that many suggests
  boxes in other units or images that are not the annotated ones.
  A missing ``area`` (or ``0``, as some exporters write) is the (clipped) box's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...errors import DataError

MAX_REPAIRED = 0.01  # share of a file's annotations that may be repaired (clipped or dropped) before it is refused
CLIP_TOLERANCE = 1.0  # pixels a box may overshoot its image without being counted (rounding in converters)
MIN_BOX_SIDE = 1.0  # pixels; a thinner box after clipping is empty
MAX_COORDINATE = 1e12  # pixels; a polygon coordinate beyond is a unit or parsing error (and clips imprecisely)

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
