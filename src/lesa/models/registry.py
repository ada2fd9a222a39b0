"""Model registry: ``create_model(name, **kwargs)`` and ``list_models()``.

Names are ``[op_]arch`` with ``op`` in ``sa``, ``aa``, ``static_lesa``, ``lesa`` (none: the conv
baseline) and ``arch`` in ``resnet50``, ``wide_resnet50_2`` and ``resnet_tiny`` (a small ResNet for 32x32
inputs that trains on a CPU in minutes).
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, ConfigError
from ..layers.checks import check_int, describe
from .resnet import OPS, ResNet

# Keyword arguments of the attention layers, per operation (the conv baseline takes none).
LAYER_KWARGS: dict[str, tuple[str, ...]] = {
    "conv": (),
    "sa": ("heads", "pos_embed", "impl", "unary", "checkpoint"),
    "static_lesa": ("heads", "pos_embed", "impl", "unary", "checkpoint"),
    "lesa": ("heads", "pos_embed", "impl", "unary", "checkpoint"),
    "aa": ("heads", "pos_embed", "impl", "checkpoint"),
}
LAYER_DEFAULTS: dict[str, Any] = dict(heads=8, pos_embed="flat", impl="auto", unary="conv", checkpoint=False)

# The architectures and what their inputs look like: ImageNet-sized for the paper's models, and the
# embedded 32 px sets (normalised to mean = std = 0.5, ten classes) for the CPU-sized tiny variants.
ARCHS: dict[str, dict[str, Any]] = {
    "resnet50": dict(layers=(3, 4, 6, 3), width_per_group=64),
    "wide_resnet50_2": dict(layers=(3, 4, 6, 3), width_per_group=128),
    "resnet_tiny": dict(layers=(1, 1, 2, 2), widths=(16, 32, 64, 128), width_per_group=64, stem="small",
                        stem_width=32),
}
IMAGENET_INPUT = dict(img_size=224, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000)
EMBEDDED_INPUT = dict(img_size=32, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
ARCH_INPUT = {"resnet50": IMAGENET_INPUT, "wide_resnet50_2": IMAGENET_INPUT, "resnet_tiny": EMBEDDED_INPUT}

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


def default_cfg(name: str, **model_kwargs: Any) -> dict[str, Any]:
    """A model's defaults, the one place they are written: input size, crop, mean/std, classes (timm's
    ``pretrained_cfg`` keys), for the given layer options (``'flat'`` tables fix the input size)."""
    op, arch = parse_name(name)
    inputs = ARCH_INPUT[arch]
    size = model_kwargs.get("img_size") or inputs["img_size"]
    height, width = (size, size) if isinstance(size, int) else size
    pos_embed = model_kwargs.get("pos_embed", LAYER_DEFAULTS["pos_embed"])
    # the stem reduces by 4 (7x7/2 + max-pool) or 1 ('small'), stages 2-3 by 2 each, stage 4 by last_stride:
    # 2 for conv models, 1 for attention models (the paper's layout)
    stem = model_kwargs.get("stem") or ARCHS[arch].get("stem", "imagenet")
    last_stride = model_kwargs.get("last_stride") or (2 if op == "conv" else 1)
    reduction = (4 if stem == "imagenet" else 1) * 4 * last_stride
    return dict(
        url="", num_classes=inputs["num_classes"], input_size=(model_kwargs.get("in_chans", 3), height, width),
        pool_size=(-(-height // reduction), -(-width // reduction)), crop_pct=inputs["crop_pct"],
        interpolation="bilinear",
        mean=inputs["mean"], std=inputs["std"], first_conv="conv1", classifier="fc",
        fixed_input_size=op != "conv" and pos_embed == "flat",
    )


def check_layer_options(op: str, arch: str, options: dict[str, Any]) -> None:
    """Refuse layer options that the model's layers do not take (``heads`` on a conv model, a typo)."""
    unused = sorted(set(options) - set(LAYER_KWARGS[op]))
    if unused:
        takes = ", ".join(LAYER_KWARGS[op]) or "none: it has no attention layers"
        raise ConfigError(f"{model_name(op, arch)} does not use the layer option(s) {', '.join(unused)} (it takes "
                          f"{takes}); drop them or choose another model")


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Every check :func:`create_model` makes on ``name`` and its keyword arguments, without allocating
    anything: the model is built on the meta device (a fraction of a second for lesa_resnet50)."""
    with torch.device("meta"):
        create_model(name, **options)


def unknown_model(name: str) -> ConfigError:
    base, _, tag = name.partition(".")
    if tag and base in list_models():  # timm's 'name.tag' spelling
        return ConfigError(f"unknown model {name!r}: lesa's model names take no tag; use {base!r} (with "
                           "pretrained=True for the shipped weights; timm.create_model takes the tagged name)")
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")


def build_resnet(
    op: str,
    arch: str,
    *,
    num_classes: Optional[int] = None,
    img_size: Optional[int | tuple[int, int]] = None,
    in_chans: int = 3,
    last_stride: Optional[int] = None,
    dcn_stages: tuple[int, ...] = (),
    stem: Optional[str] = None,
    drop_rate: float = 0.0,
    zero_init_residual: bool = False,
    global_pool: str = "avg",
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    **layer_kwargs: Any,
) -> ResNet:
    """Build ``arch`` with ``op`` in the 3x3 slots of stages 3-4.

    Attention models run stage 4 at stride 1 (``last_stride=1``) as the paper does; detection backbones
    pass ``last_stride=2``. ``img_size`` sets the map size the position tables are built for; ``stem``
    overrides the architecture's (``'imagenet'``: 7x7/2 + max-pool, ``'small'``: 3x3/1). ``num_classes``
    defaults to the architecture's (:func:`default_cfg`); 0 builds no head. ``global_pool``: ``'avg'``,
    ``'max'`` or ``''`` (none: the model outputs feature maps when ``num_classes=0``). ``layer_kwargs`` (``heads``,
    ``pos_embed``, ``impl``, ``unary``, ``checkpoint``) go to the attention layers; an option the model's
    layers do not take is an error. ``device`` / ``dtype``: torch.nn's factory arguments, every parameter and
    buffer created there and so (``'meta'``: nothing allocated), not copied afterwards.

    Raises:
        ConfigError: an unknown option, or an argument of the wrong type, out of range or not among its choices
            (one line naming it: :class:`~lesa.models.resnet.ResNet` and the layers check theirs).
    """
    check_layer_options(op, arch, layer_kwargs)
    inputs = ARCH_INPUT[arch]
    num_classes = inputs["num_classes"] if num_classes is None else num_classes
    size = inputs["img_size"] if img_size is None else img_size
    cfg = dict(ARCHS[arch])
    if stem is not None:
        cfg["stem"] = stem
    if last_stride is None:
        last_stride = 2 if op == "conv" else 1
    check_int("last_stride", last_stride, hint="stage 4's stride: 1 as the paper's attention models, 2 as ResNet")
    if op != "conv":
        layer_kwargs = {k: layer_kwargs.get(k, LAYER_DEFAULTS[k]) for k in LAYER_KWARGS[op]}
    model = ResNet(
        stage_ops=("conv", "conv", op, op),
        strides=(1, 2, 2, last_stride),
        num_classes=num_classes,
        img_size=size,
        in_chans=in_chans,
        dcn_stages=dcn_stages,
        drop_rate=drop_rate,
        zero_init_residual=zero_init_residual,
        layer_kwargs=layer_kwargs,
        global_pool=global_pool,
        device=device,
        dtype=dtype,
        **cfg,
    )
    model.pretrained_cfg = {**default_cfg(model_name(op, arch), img_size=size, in_chans=in_chans, stem=stem,
                                          last_stride=last_stride, **layer_kwargs),
                            "num_classes": num_classes}
    return model


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

    ``pretrained=True`` loads the weights shipped with the package (the tiny models trained on Fashion-MNIST,
    :mod:`lesa.models.pretrained`; offline, nothing is downloaded): the model is built at their input size and
    class count unless ``img_size`` / ``num_classes`` are given, and its ``pretrained_cfg`` names the data, the
    test top-1, the class names and the licence. ``checkpoint_path`` loads any other weights: a checkpoint of
    ours or one converted from the authors' (``lesa convert``), by :func:`lesa.load_weights`; where the file
    records the run (a run's checkpoint or directory, a described ``.safetensors``) and it is of this model, the
    model is built with its input size, class count and layer options unless they are given. With
    ``num_classes`` given, weights whose classifier has another size load all other weights and the
    classifier is re-initialised (timm's rule; a warning says so).

    Raises:
        ConfigError: an unknown model or option, an argument that cannot work (see :func:`build_resnet`), or
            ``pretrained=True`` for a model without shipped weights (the message lists those with).
        NotFoundError, CheckpointError: a ``checkpoint_path`` that cannot be read or does not fit.
    """
    from .pretrained import pretrained_cfg_fields, pretrained_path, shipped_models

    if not isinstance(name, str):
        raise ConfigError(f"the model name must be a str, got {describe(name)}: e.g. create_model('lesa_resnet50')")
    if name not in _MODELS:
        raise unknown_model(name)
    num_classes_given = "num_classes" in kwargs
    user_options = sorted(k for k in kwargs if k != "num_classes")
    if pretrained:
        if checkpoint_path:
            raise ConfigError("pretrained=True loads the shipped weights and checkpoint_path others; pass one")
        checkpoint_path = pretrained_path(name)
        if checkpoint_path is None:
            raise ConfigError(
                f"pretrained=True: lesa ships weights (trained on Fashion-MNIST) for {', '.join(shipped_models())} "
                f"only, not {name}. Pass checkpoint_path=... (a lesa checkpoint, or an official one converted "
                "with `lesa convert`).")
    found = None
    if checkpoint_path:
        from ..weights import read_weights

        found = read_weights(checkpoint_path, task="classification")
        kwargs = {**recorded_options(name, found.config), **kwargs}
    try:
        model = _MODELS[name](**kwargs)
    except TypeError as err:  # an unknown keyword
        raise ConfigError(f"{name}: {err}. Accepted keyword arguments: see lesa.models.build_resnet") from None
    if found is not None:
        from ..weights import load_state

        try:
            load_state(model, found.state_dict, checkpoint_path, num_classes_given=num_classes_given)
        except CheckpointError as err:
            if pretrained:
                raise CheckpointError(shipped_misfit(name, user_options, err)) from None
            trained_as = found.config.get("model")
            if trained_as and trained_as != name:
                raise CheckpointError(f"{checkpoint_path} holds a {trained_as} (the file records it), not a {name}: "
                                      f"create_model({trained_as!r}, checkpoint_path=...)") from None
            raise
    if pretrained:
        model.pretrained_cfg = shipped_cfg(model.pretrained_cfg, pretrained_cfg_fields(name))
    return model


def img_size_of(name: str) -> int:
    """The input size model ``name`` is built at by default (a side, pixels)."""
    return default_cfg(name)["input_size"][-1]


def fitting_options(name: str, sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """The options of model ``name`` that weights recording no run (a bare state dict) were trained with, as far
    as their tensors show: ``pos_embed`` (which tables they hold), ``heads`` (the logits' BatchNorm channels) and
    ``img_size`` (the largest input whose map
    fits the tables; the model's own where it fits); ``{}`` for a
    model without position tables. The weights may still not fit (another model): loading says so."""
    from ..weights import tables_img_sizes

    if parse_name(name)[0] == "conv" or not any(".rel_pos." in k for k in sd):
        return {}
    options: dict[str, Any] = {"pos_embed": "rel2d" if any(k.endswith("rel_pos.height") for k in sd) else "flat"}
    # the logits' BatchNorm has a channel per head and logit term (3 for 'flat': q.k, q.r, k.r; 2 for 'rel2d')
    logits = next((v for k, v in sd.items() if k.endswith("binary.bn_logits.weight")), None)
    terms = 3 if options["pos_embed"] == "flat" else 2
    if logits is not None and logits.ndim == 1 and logits.shape[0] % terms == 0:
        options["heads"] = logits.shape[0] // terms
    try:
        model = create_model(name, device="meta", **options)  # its tables' shapes, nothing allocated
    except ConfigError:  # heads that do not fit this model: the weights are another model's, loading says so
        return {}
    key = next((k for k in model.state_dict() if ".rel_pos." in k and k in sd), None)
    sizes = tables_img_sizes(model, sd, key) if key else None
    if sizes and img_size_of(name) in sizes:  # the model's own size fits: the likeliest
        return options
    # the tables fix the map, not the input: the largest input of that map (the model's size when it fits)
    return {**options, "img_size": sizes[-1]} if sizes else options


def recorded_options(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The options a weights file records for model ``name`` (a run's or a described file's ``img_size``, class
    count and ``model_kwargs``; none when it records another model, or nothing)."""
    if config.get("model") != name:
        return {}
    options = dict(config.get("model_kwargs") or {})
    if config.get("img_size"):
        options["img_size"] = config["img_size"]
    if config.get("classes"):
        options["num_classes"] = len(config["classes"])
    return options


def run_description(cfg: dict[str, Any]) -> Optional[dict[str, Any]]:
    """What :func:`lesa.models.pretrained.file_description` reads back, from a classification run's configuration
    (``None`` where it lacks the model or classes): the metadata ``lesa convert`` writes into a ``.safetensors``."""
    if not (isinstance(cfg.get("model"), str) and is_model(cfg["model"]) and isinstance(cfg.get("classes"), list)):
        return None
    img_size = cfg.get("img_size") or default_cfg(cfg["model"])["input_size"][-1]  # a run's None: the model's
    keys = ("model", "classes", "model_kwargs", "data")
    return {"img_size": img_size, **{k: cfg[k] for k in keys if cfg.get(k) not in (None, {})}}


def shipped_cfg(model_cfg: dict[str, Any], shipped: dict[str, Any]) -> dict[str, Any]:
    """A model's ``pretrained_cfg`` with the fields of the shipped weights it loaded; the class names only
    where its classifier is theirs (not re-initialised for another ``num_classes``)."""
    same_head = model_cfg.get("num_classes") == shipped["num_classes"]
    return {**model_cfg, **{k: v for k, v in shipped.items() if same_head or k not in ("num_classes", "label_names")}}


def shipped_misfit(name: str, options: list[str], err: Exception) -> str:
    """The message for shipped weights that do not fit the model the caller's options built: which options to
    drop (the weights are for the model at their own input size, 3 channels and default options)."""
    from .pretrained import pretrained_kwargs

    given = ", ".join(options) or "none"
    return (f"pretrained=True: the shipped {name} weights fit {name} built at img_size="
            f"{pretrained_kwargs(name)['img_size']} with 3 input channels and default options; drop the option(s) "
            f"({given}) that change it, or fine-tune at another size with `lesa train --init FILE` (which resizes "
            f"the position tables). {err}")
