"""COCO-format detection and instance segmentation data: validation, reading (polygon and RLE masks, or boxes
only) and writing. The format is COCO's (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014,
arXiv 1405.0312; https://cocodataset.org/#format-data), read with pycocotools; the COCO evaluation of a
detector and its results files are :mod:`lesa.detection.evaluate`'s.

A dataset is an annotation JSON in COCO's format plus an image folder. Category ids (COCO's run 1..90 with
gaps) map to contiguous labels ``1..K`` (0 is torchvision's background). A run has one mapping, taken from
its training file; every other file (validation, ``det eval --data``) is read through it
(``categories=``), so predictions go back out with the run's ids and names.

Policies of :class:`CocoDetection`, the same for every file it loads (training, validation, evaluation), each
told in the module that implements it:

* :mod:`~lesa.data.coco.schema`: the schema the whole file is validated by, and masks in every annotation
  or in none;
* :mod:`~lesa.data.coco.repairs`: the masks and boxes repaired (clipped, dropped, counted), and the share of
  repairs that refuses a file;
* :mod:`~lesa.data.coco.image_files`: image sizes (headers, EXIF orientation) and missing image files;
* :mod:`~lesa.data.coco.categories`: categories read through the run's mapping;
* :mod:`~lesa.data.coco.dataset`: the report (``summary``, ``repairs``) and HTC's semantic maps.
"""
from .categories import INSTANCE_SEMANTIC, semantic_class_count
from .dataset import CocoDetection, annotation_mask, collate_detection, collate_training, encode_mask, hflip
from .repairs import MAX_REPAIRED, Repairs, clean_annotation, rle_counts
from .schema import read_coco_file, write_coco

__all__ = [
    "INSTANCE_SEMANTIC",
    "MAX_REPAIRED",
    "CocoDetection",
    "Repairs",
    "annotation_mask",
    "clean_annotation",
    "collate_detection",
    "collate_training",
    "encode_mask",
    "hflip",
    "read_coco_file",
    "rle_counts",
    "semantic_class_count",
    "write_coco",
]
