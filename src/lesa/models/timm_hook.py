"""Register the lesa models with timm, so ``timm.create_model('lesa_resnet50')`` works after ``import lesa``.

Names timm already has (``resnet50``, ``wide_resnet50_2``) are left to timm. Registration is skipped
silently when timm is not installed.
"""
from __future__ import annotations

import sys
from typing import Any

from .registry import create_model, default_cfg, list_models

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
        default_cfgs[name] = default_cfg(name)
        fn = _entrypoint(name)
        setattr(sys.modules[__name__], name, fn)
        register_model(fn)
        registered.append(name)
    return registered
