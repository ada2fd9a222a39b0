"""Detection and instance segmentation with lesa backbones: Mask R-CNN, Cascade Mask R-CNN and HTC on
torchvision, and Faster R-CNN / Cascade R-CNN for box-only data."""
from .backbone import LesaFPNBackbone, build_backbone
from .cascade import CascadeRoIHeads, DetectionTransform, FusedSemanticHead
from .detectors import BOX_ONLY, DETECTORS, build_detector, build_maskrcnn, load_backbone_weights

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
