"""A COCO file's image files, checked when it is loaded (:func:`check_image_files`): each one's header (size
and EXIF orientation) against the JSON, and what to say of a missing one.

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
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from ...errors import BadImageError, DataError
from ..images import DECODE_ERRORS

HEADER_THREADS = 8  # header reads wait on storage more than on the CPU
EXIF_ORIENTATION = 0x0112
# How to get the stored pixels back from read_image's upright image, for the orientations that swap the sides
UNDO_ORIENTATION = {5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                    8: Image.Transpose.ROTATE_270}


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
