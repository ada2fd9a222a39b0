"""Runs that move: a run knows its data by identity, and finds it from any working folder.

A run stores, in every checkpoint (``data_identity``), its data as the absolute path it was given (resolved
once, at the start), the same path relative to the run folder, and a fingerprint of each split: a SHA-256
over the files' paths (relative to the split) and sizes, and over the bytes of annotation files (COCO). A
named set (``digits``, ``fashion-mnist``, ``digit-scenes``) is its own identity.

eval, analyze and det eval without ``--data`` look for the data at the relative path from where the run
folder is now, then at the absolute path, and take the first whose fingerprint matches; a resume given
``--data`` elsewhere goes on when the fingerprints match (the data moved), and is refused with the
difference when they do not. A run moved together with its data (a project folder copied to another
machine) therefore evaluates and resumes as it is.

Listing ImageNet's 1.28M files and their sizes is the cost of a fingerprint (the listing is done for
training anyway; the sizes add one ``stat`` per file): see docs/training.md for the measured figure.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError, DataError, NotFoundError

Fingerprints = dict[str, str]  # split -> hex digest


def fingerprint_files(root: str | Path, files: Iterable[str | Path], annotations: Iterable[str | Path] = ()) -> str:
    """SHA-256 (hex, 16 digits) over ``files`` (their paths relative to ``root`` and sizes, in sorted order) and
    over the bytes of the ``annotations`` files.

    Raises:
        NotFoundError: a file vanished while it was listed.
    """
    digest = hashlib.sha256()
    root = str(root).rstrip(os.sep) + os.sep
    try:
        # slicing, not os.path.relpath: the files are listed below root, and relpath costs more than the stat
        entries = sorted((f[len(root):] if f.startswith(root) else os.path.relpath(f, root), os.stat(f).st_size)
                         for f in map(str, files))
        digest.update("".join(f"{rel}\0{size}\n" for rel, size in entries).encode("utf-8", "surrogateescape"))
        for annotation in annotations:
            with open(annotation, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    except FileNotFoundError as err:
        raise NotFoundError(f"{err.filename} vanished while the data was listed: run again once it is stable") \
            from None
    return digest.hexdigest()[:16]


def is_folder_data(data: Optional[str], names: Iterable[str]) -> bool:
    """Whether ``data`` is a folder (not one of the named sets ``names``)."""
    return bool(data) and data not in set(names)


def identity(data: str, run_folder: Path, fingerprints: Fingerprints, **described: Any) -> dict[str, Any]:
    """What a checkpoint stores of its data: ``data`` (absolute), ``relative`` (to the run folder), the split
    ``fingerprints`` and anything ``described`` (classes, image counts)."""
    relative = None
    try:
        relative = os.path.relpath(Path(data).resolve(), Path(run_folder).resolve())
    except (OSError, ValueError):  # another drive (Windows) or a path that cannot be resolved
        pass
    return dict(data=data, relative=relative, fingerprints=dict(fingerprints), **described)


def locate(run_folder: Path, saved: Mapping[str, Any], fingerprint: Callable[[str, tuple[str, ...]], Fingerprints],
           splits: tuple[str, ...]) -> str:
    """The run's data folder as seen from here: the relative path from ``run_folder``, then the absolute one,
    whichever's ``splits`` fingerprints match ``saved`` (a checkpoint's ``data_identity``); where neither
    matches, the first that exists (its files changed since the run: a warning says so).

    Raises:
        NotFoundError: neither holds the run's data (both places named, and the fix).
    """
    data = str(saved.get("data"))
    candidates = []
    if saved.get("relative"):
        candidates.append(Path(run_folder) / saved["relative"])
    if os.path.isabs(data):
        candidates.append(Path(data))
    wanted = {s: saved.get("fingerprints", {}).get(s) for s in splits}
    differing = []
    for candidate in candidates:
        try:
            if not candidate.is_dir():
                continue
            found = fingerprint(str(candidate), splits)
        except (OSError, DataError):
            continue
        if all(wanted[s] is None or found.get(s) == wanted[s] for s in splits):
            return str(candidate.resolve())
        differing.append(candidate)
    if differing:  # the run's own place, its files changed since (images added, say): evaluated as they are now
        warnings.warn(f"{differing[0]}: the run's data has changed since it was trained (other files or sizes in "
                      f"{', '.join(splits)}); evaluating it as it is now", stacklevel=2)
        return str(differing[0].resolve())
    places = f"{data}" + (f", or {saved['relative']} from the run folder {run_folder}" if saved.get("relative") else "")
    if not os.path.isabs(data) and not saved.get("relative"):
        raise ConfigError(f"the run stored its data as the relative path {data!r}, relative to the folder it was "
                          "started from: pass --data with that folder")
    raise NotFoundError(f"the run's data is not where it was ({places}): pass --data with the folder that holds "
                        f"it{describe(saved)}")


def describe(saved: Mapping[str, Any]) -> str:
    """`` (N classes, M training images)`` for messages, from a ``data_identity``."""
    parts = []
    if saved.get("classes"):
        parts.append(f"{len(saved['classes'])} classes")
    if saved.get("train_images"):
        parts.append(f"{saved['train_images']} training images")
    return f" ({', '.join(parts)})" if parts else ""


def difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """How the current data differs from the run's, for a refused resume."""
    parts = []
    for key, what in (("train_images", "training images"), ("val_images", "validation images")):
        if saved.get(key) is not None and current.get(key) is not None and saved[key] != current[key]:
            parts.append(f"{current[key]} {what} where the run had {saved[key]}")
    changed = [s for s, fp in saved.get("fingerprints", {}).items() if current.get("fingerprints", {}).get(s) != fp]
    if changed and not parts:
        parts.append(f"the files of {' and '.join(changed)} differ in names or sizes")
    return "; ".join(parts) or "other files"
