"""Detection and instance segmentation with lesa backbones: Mask R-CNN, Cascade Mask R-CNN and HTC on
torchvision, and Faster R-CNN / Cascade R-CNN for box-only data."""
from .backbone import LesaFPNBackbone, build_backbone
from .cascade import CascadeRoIHeads, FusedSemanticHead
from .detectors import BOX_ONLY, DETECTORS, build_detector, build_maskrcnn, load_backbone_weights
from .transform import DetectionTransform

__all__ = [
    "BOX_ONLY",
    "DETECTORS",
    "CascadeRoIHeads",
    "DetectionTransform",
    "FusedSemanticHead",
    "LesaFPNBackbone",
    "build_backbone",
    "build_detector",
    "build_maskrcnn",
    "load_backbone_weights",
]
