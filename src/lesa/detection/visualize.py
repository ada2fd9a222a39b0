"""Drawing predictions: boxes, labels, scores and masks (the paper's Figs. 1, 2 and 4)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.images import read_image
from ..errors import BadImageError

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990",
           "#9a6324"]


def load_image(path: str | Path) -> Tensor:
    """``(3, H, W)`` float image in [0, 1], read by :func:`lesa.data.images.read_image` (upright, contrast of
    16-bit images kept). Raises :class:`lesa.errors.NotFoundError` and :class:`lesa.errors.BadImageError` (a
    folder too)."""
    if Path(path).is_dir():
        pattern = Path(path) / "*.png"
        raise BadImageError(str(path), f"it is a folder, not an image; pass the images in it, e.g. {pattern}")
    return pil_to_tensor(read_image(path)).float() / 255.0


def draw_prediction(image: Tensor, prediction: dict[str, Tensor], classes: list[str],
                    score_threshold: float = 0.5, mask_threshold: float = 0.5) -> Image.Image:
    """The image with the masks, boxes and ``label score`` captions of the detections above the threshold."""
    keep = prediction["scores"] >= score_threshold
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    labels = prediction["labels"][keep].tolist()
    colors = [PALETTE[label % len(PALETTE)] for label in labels]
    if "masks" in prediction and keep.any():
        masks = prediction["masks"][keep][:, 0] >= mask_threshold
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colors)
    scores = prediction["scores"][keep].tolist()
    captions = [f"{classes[label - 1]} {score:.2f}" for label, score in zip(labels, scores)]
    if labels:
        canvas = draw_bounding_boxes(canvas, prediction["boxes"][keep], captions, colors=colors, width=2)
    return to_pil_image(canvas)
