"""Register the lesa models with timm, so ``timm.create_model('lesa_resnet50')`` works after ``import lesa``.

Names timm already has (``resnet50``, ``wide_resnet50_2``) are left to timm. Registration is skipped
silently when timm is not installed.
"""
from __future__ import annotations

import sys
from typing import Any

from .registry import create_model, list_models

default_cfgs: dict[str, dict[str, Any]] = {}
registered: list[str] = []


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    return entrypoint


def register_with_timm() -> list[str]:
    try:
        from timm.models import is_model, register_model
    except ImportError:
        return []
    for name in list_models():
        if name in registered or is_model(name):
            continue
        size = 32 if name.endswith("_tiny") else 224
        default_cfgs[name] = dict(
            url="", num_classes=10 if name.endswith("_tiny") else 1000, input_size=(3, size, size),
            pool_size=None, crop_pct=0.875 if size == 224 else 1.0, interpolation="bilinear",
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="conv1", classifier="fc",
        )
        fn = _entrypoint(name)
        setattr(sys.modules[__name__], name, fn)
        register_model(fn)
        registered.append(name)
    return registered
