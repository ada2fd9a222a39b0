"""Reading weights from files and loading them into models with errors that name what did not fit."""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .convert import convert_official_state_dict, is_official_state_dict, unwrap_state_dict
from .errors import CheckpointError, NotFoundError
from .utils import PathLike


def read_checkpoint(path: PathLike) -> Any:
    """Load a torch checkpoint (``weights_only=True``: pickled code is never run) or a ``.safetensors``
    file; a directory means its ``best.pt`` (else ``last.pt``).

    Whatever is wrong with the file (missing, empty, truncated, not a checkpoint, or carrying code)
    raises one :class:`~lesa.errors.CheckpointError` / :class:`~lesa.errors.NotFoundError` naming it.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise NotFoundError(f"{path} is a directory without best.pt or last.pt: pass a run directory or a file")
    if not path.is_file():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), probably an interrupted copy: copy the file again")
    with open(path, "rb") as f:
        head = f.read(16)
    if is_safetensors(head, size):
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # a class or function to import and call: code
            what = _unsafe_global(str(err))
            raise CheckpointError(
                f"{path} holds pickled Python objects{what} besides tensors, which lesa never loads (they can "
                "run code): in the environment that wrote it, save the tensors alone (torch.save(model.state_dict(),"
                " ...)) or convert it to .safetensors") from None
        raise CheckpointError(f"{path} is not a torch checkpoint or safetensors file ({_first_line(err)}): "
                              "check the file name, or copy the file again") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        what = "truncated or corrupt" if head.startswith(b"PK") or size < 1024 else "not a torch checkpoint"
        raise CheckpointError(f"{path} is {what} ({_first_line(err)}): copy the file again, or pass another "
                              "checkpoint") from None


def is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with the little-endian length of a JSON header, then ``{``."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is a truncated or corrupt safetensors file ({_first_line(err)}): copy "
                              "the file again") from None


def _unsafe_global(message: str) -> str:
    match = re.search(r"[Gg][Ll][Oo][Bb][Aa][Ll]:? ([\w.]+)", message)
    return f" ({match.group(1)})" if match else ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__


def model_state_dict(obj: Any) -> dict[str, Tensor]:
    """The model weights in a checkpoint object: lesa's ``{'model': ...}``, the authors' ``{'net': ...}``
    or a bare state dict; official layouts are converted."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    sd = unwrap_state_dict(obj)
    return convert_official_state_dict(sd) if is_official_state_dict(sd) else sd


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], ignore: tuple[str, ...] = (),
                     source: Optional[PathLike] = None) -> None:
    """Raise a one-line :class:`~lesa.errors.CheckpointError` naming every missing, unexpected, mis-shaped
    or wrongly typed key (of the file ``source``, if given)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(ignore)]
    unexpected = [k for k in sd if k not in own and not k.startswith(ignore)]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    # float16 / bfloat16 / float64 weights convert exactly enough; integers in a float slot are a broken
    # export (they would load as truncated values, often all zeros)
    dtypes = [
        f"{k}: checkpoint {sd[k].dtype} vs model {own[k].dtype}"
        for k in own
        if k in sd and isinstance(sd[k], Tensor) and own[k].is_floating_point() != sd[k].is_floating_point()
    ]
    if not (missing or unexpected or shapes or dtypes):
        return
    lines = [f"{'the checkpoint' if source is None else source} does not fit {type(model).__name__}"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
                        ("dtype kinds a parameter cannot have", dtypes)):
        if keys:
            more = f" (+{len(keys) - 12} more)" if len(keys) > 12 else ""
            lines.append(f"{title} ({len(keys)}): {', '.join(keys[:12])}{more}")
    if any("rel_pos" in k for k in shapes):
        lines.append(
            "position tables differ in size: build the model with the checkpoint's img_size, or resize "
            "the tables with lesa.resize_pos_embed (pos_embed='rel2d' only)"
        )
    if any("rel_pos" in k for k in missing + unexpected):
        lines.append("position embedding keys differ: is pos_embed ('flat' / 'rel2d') the checkpoint's?")
    if dtypes:
        lines.append("integer tensors where the model has floating-point ones: re-export the weights as float")
    raise CheckpointError("; ".join(lines))


def load_weights(model: nn.Module, source: PathLike | Mapping[str, Any]) -> nn.Module:
    """Load weights strictly from a file or checkpoint object (official ones are converted)."""
    is_file = isinstance(source, (str, Path))
    sd = model_state_dict(read_checkpoint(source) if is_file else source)
    check_state_dict(model, sd, source=source if is_file else None)
    model.load_state_dict(sd, strict=True)
    return model
