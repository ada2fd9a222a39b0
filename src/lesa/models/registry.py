"""Model registry: ``create_model(name, **kwargs)`` and ``list_models()``.

Names are ``[op_]arch`` with ``op`` in ``sa``, ``aa``, ``static_lesa``, ``lesa`` (none: the conv
baseline) and ``arch`` in ``resnet50``, ``wide_resnet50_2`` and ``resnet_tiny`` (a small ResNet for 32x32
inputs that trains on a CPU in minutes).
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Optional

from .resnet import OPS, ResNet

# Keyword arguments forwarded to the attention layers (ignored by the conv baselines).
LAYER_KWARGS = ("heads", "pos_embed", "impl", "unary", "checkpoint")

ARCHS: dict[str, dict[str, Any]] = {
    "resnet50": dict(layers=(3, 4, 6, 3), width_per_group=64, img_size=224),
    "wide_resnet50_2": dict(layers=(3, 4, 6, 3), width_per_group=128, img_size=224),
    "resnet_tiny": dict(
        layers=(1, 1, 2, 2), widths=(16, 32, 64, 128), width_per_group=64, stem="small", stem_width=32,
        img_size=32,
    ),
}

_MODELS: dict[str, Callable[..., ResNet]] = {}


def model_name(op: str, arch: str) -> str:
    return arch if op == "conv" else f"{op}_{arch}"


def parse_name(name: str) -> tuple[str, str]:
    """``'lesa_resnet50'`` -> ``('lesa', 'resnet50')``."""
    for op in sorted(OPS, key=len, reverse=True):
        if op != "conv" and name.startswith(op + "_") and name[len(op) + 1 :] in ARCHS:
            return op, name[len(op) + 1 :]
    if name in ARCHS:
        return "conv", name
    raise unknown_model(name)


def unknown_model(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")


def build_resnet(
    op: str,
    arch: str,
    *,
    num_classes: int = 1000,
    img_size: Optional[int | tuple[int, int]] = None,
    in_chans: int = 3,
    last_stride: Optional[int] = None,
    dcn_stages: tuple[int, ...] = (),
    stem: Optional[str] = None,
    drop_rate: float = 0.0,
    zero_init_residual: bool = False,
    heads: int = 8,
    pos_embed: str = "flat",
    impl: str = "auto",
    unary: str = "conv",
    checkpoint: bool = False,
) -> ResNet:
    """Build ``arch`` with ``op`` in the 3x3 slots of stages 3-4.

    Attention models run stage 4 at stride 1 (``last_stride=1``) as the paper does; detection backbones
    pass ``last_stride=2``. ``img_size`` sets the map size the position tables are built for; ``stem``
    overrides the architecture's (``'imagenet'``: 7x7/2 + max-pool, ``'small'``: 3x3/1).
    """
    cfg = dict(ARCHS[arch])
    if stem is not None:
        cfg["stem"] = stem
    size = cfg.pop("img_size")
    size = size if img_size is None else img_size
    if last_stride is None:
        last_stride = 2 if op == "conv" else 1
    layer_kwargs = dict(heads=heads, pos_embed=pos_embed, impl=impl, unary=unary, checkpoint=checkpoint)
    if op == "aa":
        layer_kwargs.pop("unary")
    return ResNet(
        stage_ops=("conv", "conv", op, op),
        strides=(1, 2, 2, last_stride),
        num_classes=num_classes,
        img_size=size,
        in_chans=in_chans,
        dcn_stages=dcn_stages,
        drop_rate=drop_rate,
        zero_init_residual=zero_init_residual,
        layer_kwargs=layer_kwargs,
        **cfg,
    )


def _make_builder(op: str, arch: str) -> Callable[..., ResNet]:
    name = model_name(op, arch)

    def builder(**kwargs: Any) -> ResNet:
        return build_resnet(op, arch, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    what = "convolution (torchvision's architecture)" if op == "conv" else f"{op.upper()} in stages 3-4"
    builder.__doc__ = f"{arch} with {what}. Keyword arguments: see :func:`build_resnet`."
    return builder


for _arch in ARCHS:
    for _op in OPS:
        _MODELS[model_name(_op, _arch)] = _make_builder(_op, _arch)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs: Any) -> ResNet:
    """Create a registered model.

    ``pretrained=True`` is not available (no weights can be downloaded); use ``checkpoint_path`` with a
    checkpoint of ours or one converted from the authors' (``lesa convert``).
    """
    if name not in _MODELS:
        raise unknown_model(name)
    if pretrained:
        raise ValueError(
            "pretrained=True: lesa ships no weights. Pass checkpoint_path=... (a lesa checkpoint, or an "
            "official one converted with `lesa convert`)."
        )
    try:
        model = _MODELS[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"{name}: {err}. Accepted keyword arguments: see lesa.models.build_resnet") from None
    if checkpoint_path:
        from ..weights import load_weights

        load_weights(model, checkpoint_path)
    return model
