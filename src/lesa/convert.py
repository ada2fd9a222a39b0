"""Import the authors' checkpoints (Chenglin-Yang/LESA_classification and LESA_detection).

The official LESA module names its parts after their role in the code (``x_transform``, ``reasoning``,
...); ours name them after the paper. Everything else in the ResNet (stem, 1x1 convs, downsample, fc) has
torchvision's names in both. :func:`convert_official_state_dict` renames, reshapes the 1-D ``qkv``
projection to a 1x1 conv, drops the derived ``flatten_index`` buffer, and unwraps the usual containers.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from .errors import CheckpointError
from .utils import PathLike

# Leading path components of an official LESA parameter -> our module path.
_RENAMES: dict[tuple[str, ...], str] = {
    ("qkv_transform",): "binary.qkv",
    ("bn_qkv",): "binary.bn_qkv",
    ("bn_similarity",): "binary.bn_logits",
    ("bn_output",): "binary.bn_out",
    ("relative",): "binary.rel_pos.relative",
    ("rel_height",): "binary.rel_pos.height",
    ("rel_width",): "binary.rel_pos.width",
    ("x_transform", "0"): "unary.conv",
    ("x_transform", "1"): "unary.proj",
    ("bn_x",): "unary.bn",
    ("reasoning", "1"): "fusion_gate.fc1",
    ("reasoning", "2"): "fusion_gate.bn1",
    ("projection", "0"): "fusion_gate.fc2",
    ("projection", "1"): "fusion_gate.bn2",
}
_DROPPED = {"flatten_index"}
_OFFICIAL_NAMES = {k[0] for k in _RENAMES} | _DROPPED
_WRAPPERS = ("state_dict", "net", "model", "module")


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint: ``{'net': ...}``, ``{'state_dict': ...}``, ... or bare (keys as
    saved: :func:`strip_wrapper_prefixes` removes a wrapped model's prefixes)."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(
                f"no state dict found in the checkpoint: top-level keys are {sorted(obj)[:10]}; expected "
                f"tensors, or one of {_WRAPPERS} holding them"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must hold a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


# The key prefixes a wrapped model adds: DistributedDataParallel / DataParallel 'module.', torch.compile
# '_orig_mod.' (nested wrappers stack them: torch.compile(DDP(model)) saves '_orig_mod.module.').
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(sd: Mapping[str, Tensor], source: Optional[PathLike] = None) -> dict[str, Tensor]:
    """``sd`` without the key prefixes that every key has from a wrapped model (:data:`WRAPPER_PREFIXES`, in
    any combination and order: ``module._orig_mod.``, ``_orig_mod.module.``); a warning says what was removed.

    Only prefixes shared by every key are removed: a model's own module named ``module`` keeps its keys.
    """
    prefix = ""
    while sd and (found := next((p for p in WRAPPER_PREFIXES if all(k.startswith(prefix + p) for k in sd)), None)):
        prefix += found
    if not prefix:
        return dict(sd)
    warnings.warn(f"{source or 'the checkpoint'}: removed the key prefix {prefix!r} of a wrapped model (torch.compile, "
                  "DataParallel / DistributedDataParallel) from its weights", stacklevel=3)
    return {k[len(prefix):]: v for k, v in sd.items()}


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def is_official_state_dict(sd: Mapping[str, Tensor]) -> bool:
    return any(_official_position(key.split(".")) is not None for key in sd)


def _official_position(parts: list[str]) -> int | None:
    """Index of the first path component that names an official LESA part (None: not a LESA key).

    ``bn_qkv`` and ``relative`` are also lesa names, below ``binary`` / ``rel_pos``: those are ours.
    """
    for i, part in enumerate(parts):
        if part in _OFFICIAL_NAMES and not (i > 0 and parts[i - 1] in ("binary", "rel_pos")):
            return i
    return None


def convert_official_state_dict(sd: Any, backbone_only: bool = True) -> dict[str, Tensor]:
    """Convert an official checkpoint (whole model or a single LESA layer) to lesa's layout.

    Accepts the checkpoint object itself (``{'net': ...}``, mmdetection's ``{'state_dict': ...}``) or a
    bare state dict, with or without ``module.``. For an mmdetection detector, ``backbone.*`` keys are
    kept (prefix removed) and the neck and heads are dropped when ``backbone_only``. The result loads with
    ``load_state_dict(strict=True)`` into the matching ``lesa`` model or :class:`~lesa.LESA2d`.
    """
    sd = strip_wrapper_prefixes(unwrap_state_dict(sd))
    if backbone_only and any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        parts = key.split(".")
        pos = _official_position(parts)
        if pos is None:
            out[key] = value
            continue
        if parts[pos] in _DROPPED:
            continue
        rest = parts[pos:]
        match = next((k for k in _RENAMES if tuple(rest[: len(k)]) == k), None)
        if match is None:
            unknown.append(key)
            continue
        new_key = ".".join(parts[:pos] + [_RENAMES[match]] + rest[len(match) :])
        if match == ("qkv_transform",) and value.dim() == 3:
            value = value.unsqueeze(-1)  # Conv1d (2C, C, 1) -> 1x1 Conv2d
        out[new_key] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} official LESA keys have no counterpart in lesa (a configuration other than "
            f"df_channel_shrink=[2], df_kernel_size=[1,1]?): {unknown[:8]}"
        )
    return out


TORCH_SUFFIXES = (".pth", ".pt")
WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")  # what save_state_dict writes


def save_state_dict(sd: Mapping[str, Tensor], path: str, description: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``sd`` atomically as ``.safetensors`` or a torch ``.pth``/``.pt`` file; ``description`` (the run
    the weights come from, :func:`lesa.models.registry.run_description`) goes into a safetensors file's
    metadata under the key ``lesa`` (a torch file holds the tensors only)."""
    import json

    from .utils import atomic_write

    path = str(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = {"lesa": json.dumps(dict(description))} if description else None
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    elif path.lower().endswith(TORCH_SUFFIXES):
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise CheckpointError(f"output {path!r}: use a .pth, .pt or .safetensors file name")
