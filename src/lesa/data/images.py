"""The one image reader: every image lesa loads (class folders, COCO images, ``det predict`` inputs) goes
through :func:`read_image`, every segmentation map (HTC's semantic maps) through :func:`read_label_map`.

Policies:

* **Orientation.** The EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo is read
  upright, as viewers show it and as annotation tools draw on it. Label maps get the same treatment.
* **Colour.** Every mode becomes 8-bit RGB. ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``,
  ``HSV``: PIL's conversion (ICC colour profiles are not applied). Multi-frame files (GIF, TIFF pages):
  the first frame.
* **High bit depth** (``I;16*``, ``I``, ``F``): scaled linearly from the image's own range, minimum to 0 and
  maximum to 255, not from the type's range: 12-bit data stored in 16 bits then uses the whole 8-bit range,
  a 16-bit image whose values span fewer than 257 levels does not collapse to one grey, and 32-bit integer
  and float images, which have no useful type range, follow the same rule. The map is monotonic, so
  contrast order is kept; absolute brightness between images is not. A constant image has no contrast to
  keep and becomes black; NaN counts as the minimum, infinities as the minimum or maximum.
* **Transparency** (an alpha band, or a transparency key in P, L or RGB images): composited on black, so a
  transparent pixel reads the same whatever colour the encoder left under it.
* **Bad images.** A file PIL cannot identify or decode (not an image, corrupt, truncated, unreadable) or one
  with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb guard, 89,478,485 by
  default; PIL only warns up to twice that, lesa refuses from the limit on) raises :class:`BadImageError`
  naming the file and the reason. Such a large file is more likely a bomb or a mistake than a training
  image, and decoding one costs ~3 bytes a pixel in every loader worker (590 MB for 196 MP) only to be
  resized to a few hundred pixels: downscale it, or raise ``PIL.Image.MAX_IMAGE_PIXELS`` (read at each
  call; ``None`` disables the guard). Class folders skip and count bad images
  (:class:`lesa.data.TolerantImageFolder`); detection data and ``det predict`` stop with the error.
"""
from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import BadImageError, DataError, NotFoundError

HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# What PIL raises for a file it cannot identify or decode: OSError (UnidentifiedImageError, "image file is
# truncated", "broken data stream"), and from inside its parsers SyntaxError, ValueError, EOFError, struct.error.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def image_extensions() -> frozenset[str]:
    """The lower-case extensions (``'.jpg'``, ``'.jfif'``, ``'.png'``, ``'.webp'``, ``'.tif'``, ...) of every
    format PIL can open (save-only formats such as ``.pdf`` excluded)."""
    extensions = Image.registered_extensions()  # loads all of PIL's plugins first, not only the common few
    return frozenset(ext.lower() for ext, fmt in extensions.items() if fmt in Image.OPEN)


def read_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright (see the module's policies).

    Raises :class:`NotFoundError` if there is no such file and :class:`BadImageError` if it cannot be decoded
    or exceeds the pixel limit.
    """
    image = _open(Path(path))
    if image.mode in HIGH_DEPTH_MODES:
        grey = _stretch(np.asarray(image, dtype=np.float64))
        return Image.fromarray(grey).convert("RGB")
    try:
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            return _on_black(image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as err:  # a mode PIL reads but cannot convert (e.g. 'La')
        raise BadImageError(str(path), f"mode {image.mode!r} cannot be converted to RGB ({err})") from None


def read_label_map(path: str | Path) -> np.ndarray:
    """The ``(H, W)`` int64 class ids of a segmentation map: a palette PNG's indices, a greyscale (``L``,
    ``I;16``, ``I``) image's values; never converted through RGB. EXIF orientation applied as for images.

    Raises :class:`NotFoundError` if there is no such file, :class:`BadImageError` if it cannot be decoded and
    :class:`DataError` if it has several channels or float values.
    """
    image = _open(Path(path))
    bands = image.getbands()
    if len(bands) > 1:
        raise DataError(f"label map {path} has {len(bands)} channels (mode {image.mode}); it must be "
                        "single-channel: a palette or greyscale PNG whose values are the class ids")
    if image.mode == "F":
        raise DataError(f"label map {path} holds floating-point values; it must hold integer class ids "
                        "(a palette or greyscale PNG)")
    return np.asarray(image).astype(np.int64)


def _open(path: Path) -> Image.Image:
    """The decoded first frame, EXIF orientation applied. Raises NotFoundError, BadImageError."""
    if not path.is_file():
        raise NotFoundError(f"image {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; one limit, one outcome
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                image = Image.open(f)
                image.load()
            return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(str(path), _too_large(str(err))) from None
    except UnidentifiedImageError:  # its message names an anonymous file handle
        raise BadImageError(str(path), "PIL cannot identify it as an image (not an image, or a format PIL "
                                       "lacks a plugin for)") from None
    except DECODE_ERRORS as err:
        raise BadImageError(str(path), f"{type(err).__name__}: {err}") from None


def _too_large(message: str) -> str:
    # PIL's message states twice the limit when it errors, the limit when it warns: state lesa's one limit
    pixels = re.search(r"\((\d+) pixels\)", message)
    size = f"{int(pixels.group(1)):,} pixels, more" if pixels else "more pixels"
    return (f"{size} than PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,} (a guard against decompression "
            "bombs); downscale it")


def _stretch(values: np.ndarray) -> np.ndarray:
    """uint8 of ``values`` scaled linearly from their finite range to 0..255; black if constant."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.min() == finite.max():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _on_black(rgba: Image.Image) -> Image.Image:
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")
