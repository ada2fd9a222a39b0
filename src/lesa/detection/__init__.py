"""Detection and instance segmentation: Mask R-CNN + FPN with LESA backbones on torchvision."""
from .backbone import LesaFPNBackbone, build_backbone
from .maskrcnn import build_maskrcnn, load_backbone_weights

__all__ = ["LesaFPNBackbone", "build_backbone", "build_maskrcnn", "load_backbone_weights"]
