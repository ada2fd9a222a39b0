"""Reading weights from files and loading them into models with errors that name what did not fit."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .convert import convert_official_state_dict, is_official_state_dict, unwrap_state_dict
from .utils import PathLike


def read_checkpoint(path: PathLike) -> Any:
    """Load a ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} is a directory without best.pt or last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name and the likely cause
        raise ValueError(
            f"could not read {str(path)!r} as a weights-only torch checkpoint ({err}). Checkpoints are "
            "loaded with weights_only=True, which refuses pickled code; re-save the state dict alone."
        ) from None


def model_state_dict(obj: Any) -> dict[str, Tensor]:
    """The model weights in a checkpoint object: lesa's ``{'model': ...}``, the authors' ``{'net': ...}``
    or a bare state dict; official layouts are converted."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    sd = unwrap_state_dict(obj)
    return convert_official_state_dict(sd) if is_official_state_dict(sd) else sd


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], ignore: tuple[str, ...] = ()) -> None:
    """Raise a ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(ignore)]
    unexpected = [k for k in sd if k not in own and not k.startswith(ignore)]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"the checkpoint does not fit {type(model).__name__}:"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            more = f" (+{len(keys) - 12} more)" if len(keys) > 12 else ""
            lines.append(f"  {title} ({len(keys)}): {', '.join(keys[:12])}{more}")
    if any("rel_pos" in k for k in shapes):
        lines.append(
            "  position tables differ in size: build the model with the checkpoint's img_size, or resize "
            "the tables with lesa.resize_pos_embed (pos_embed='rel2d' only)"
        )
    if any("rel_pos" in k for k in missing + unexpected):
        lines.append("  position embedding keys differ: is pos_embed ('flat' / 'rel2d') the checkpoint's?")
    raise ValueError("\n".join(lines))


def load_weights(model: nn.Module, source: PathLike | Mapping[str, Any]) -> nn.Module:
    """Load weights strictly from a file or checkpoint object (official ones are converted)."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    sd = model_state_dict(obj)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    return model
