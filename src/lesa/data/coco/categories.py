"""A COCO file's categories read through the run's (:func:`run_categories`), and the classes of HTC's
semantic maps (:func:`semantic_class_count`).

* **Categories.** Read through the run's mapping (``categories=``): a category the run does not know that an
  annotation uses is refused; one that no annotation uses is ignored and said in the summary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ...errors import DataError

INSTANCE_SEMANTIC = "instances"
COCO_STUFF_CLASSES = 183  # COCO-stuff's stuffthingmaps: 182 labels and 0, 255 unlabeled (mmdetection's HTC)
IGNORE_LABEL = 255  # a semantic map's "unlabeled"


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
