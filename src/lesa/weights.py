"""Reading weights from files and loading them into models with errors that name what did not fit."""
from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .convert import (
    convert_official_state_dict,
    is_official_state_dict,
    strip_wrapper_prefixes,
    unwrap_state_dict,
)
from .errors import CheckpointError, NotFoundError
from .utils import PathLike


def read_checkpoint(path: PathLike) -> Any:
    """Load a torch checkpoint (``weights_only=True``: pickled code is never run) or a ``.safetensors``
    file; a directory means its ``best.pt`` (else ``last.pt``).

    Whatever is wrong with the file (missing, a name the system refuses, empty, truncated, not a checkpoint,
    or carrying code) raises one :class:`~lesa.errors.CheckpointError` / :class:`~lesa.errors.NotFoundError`
    naming it.
    """
    try:
        path = _checkpoint_file(Path(path))
        size = path.stat().st_size
    except NotFoundError:  # itself an OSError (FileNotFoundError), already naming the path
        raise
    except OSError as err:  # a name too long for the file system, a folder without permission, ...
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}): check the path") from None
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
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        # a text or other non-pickle file makes the unpickler fail with any of these
        what = "truncated or corrupt" if head.startswith(b"PK") else "not a torch checkpoint"
        raise CheckpointError(f"{path} is {what} ({_first_line(err)}): copy the file again, or pass another "
                              "checkpoint") from None


def _checkpoint_file(path: Path) -> Path:
    """``path``, the ``best.pt`` (else ``last.pt``) of a directory, or the shipped weights a tagged model name
    names (``lesa_resnet_tiny.fashion_mnist``); raises NotFoundError when there is none."""
    from .models.pretrained import shipped_file

    shipped = shipped_file(str(path))
    if shipped is not None:
        return shipped
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise NotFoundError(f"{path} is a directory without best.pt or last.pt: pass a run directory or a file")
    if not path.is_file():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


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


def model_state_dict(obj: Any, source: Optional[PathLike] = None) -> dict[str, Tensor]:
    """The model weights in a checkpoint object (of the file ``source``, named in notes and errors): lesa's
    ``{'model': ...}``, the authors' ``{'net': ...}`` or a bare state dict; the key prefixes of wrapped models
    are removed (:func:`strip_wrapper_prefixes`) and official layouts converted.

    Raises:
        CheckpointError: no state dict found in ``obj`` (its top-level keys are named).
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    sd = strip_attribute_prefix(strip_wrapper_prefixes(unwrap_state_dict(obj), source), source)
    return convert_official_state_dict(sd) if is_official_state_dict(sd) else sd


STEM = "conv1.weight"  # every lesa / torchvision ResNet starts with it


def strip_attribute_prefix(sd: Mapping[str, Tensor], source: Optional[PathLike] = None) -> dict[str, Tensor]:
    """``sd`` without the attribute a training framework keeps the network under (a LightningModule's
    ``self.model``: ``model.conv1.weight``), when every key shares one first component and the rest is a
    ResNet (its stem ``conv1.weight``); a warning names the prefix removed."""
    first = {key.split(".", 1)[0] for key in sd}
    if len(first) != 1 or STEM in sd or not all("." in key for key in sd):
        return dict(sd)
    prefix = next(iter(first)) + "."
    if prefix + STEM not in sd:
        return dict(sd)
    warnings.warn(f"{source or 'the checkpoint'}: removed the key prefix {prefix!r} (the attribute a training "
                  "framework, e.g. a LightningModule, keeps the network under) from its weights", stacklevel=3)
    return {key[len(prefix):]: value for key, value in sd.items()}


def shared_prefix_note(sd: Mapping[str, Tensor]) -> str:
    """For errors about weights that fit nothing: the first component every key shares, if any."""
    first = {key.split(".", 1)[0] for key in sd}
    if len(first) == 1 and len(sd) > 1:
        return f"; every key starts with {next(iter(first)) + '.'!r} (e.g. {next(iter(sd))})"
    return ""


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], ignore: tuple[str, ...] = (),
                     source: Optional[PathLike] = None) -> None:
    """Raise a one-line :class:`~lesa.errors.CheckpointError` naming every missing, unexpected, mis-shaped
    or wrongly typed key (of the file ``source``, if given), with the fix where one is known."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(ignore)]
    unexpected = [k for k in sd if k not in own and not k.startswith(ignore)]
    mis_shaped = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mis_shaped]
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
    weight = _classifier_keys(model)[:1]
    if weight and weight[0] in mis_shaped:
        old, new = sd[weight[0]].shape[0], own[weight[0]].shape[0]
        lines.append(f"the checkpoint's classifier has {old} classes and the model's {new}: build the model with "
                     f"num_classes={old}, or choose num_classes explicitly (create_model(..., num_classes={new}, "
                     "checkpoint_path=...), `lesa train --init`) to load the rest and re-initialise the classifier")
    if any("rel_pos" in k for k in mis_shaped):
        lines.append(
            "position tables differ in size: build the model with the checkpoint's img_size, or resize "
            "the tables with lesa.resize_pos_embed (flat=True for 'flat' tables)"
        )
    if any("rel_pos" in k for k in missing + unexpected):
        lines.append("position embedding keys differ: is pos_embed ('flat' / 'rel2d') the checkpoint's?")
    if dtypes:
        lines.append("integer tensors where the model has floating-point ones: re-export the weights as float")
    raise CheckpointError("; ".join(lines))


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """The classifier's weight and bias keys of a lesa model (its ``pretrained_cfg['classifier']``, timm's
    field); none for other modules."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    return (f"{name}.weight", f"{name}.bias") if name else ()


def with_new_classifier(model: nn.Module, sd: Mapping[str, Tensor], source: Optional[PathLike] = None
                        ) -> tuple[dict[str, Tensor], Optional[str]]:
    """timm's rule for pretrained weights when the caller chose ``num_classes``: a checkpoint whose classifier
    does not fit the model's in size gets the model's (newly initialised) one. Returns the state dict to load
    and the note to give once it loaded (``None``: the classifier fits, nothing changed)."""
    keys = _classifier_keys(model)
    weight = keys[0] if keys else None
    own = model.state_dict()
    if weight not in sd or (weight in own and sd[weight].shape == own[weight].shape):
        return dict(sd), None
    new = own[weight].shape[0] if weight in own else 0
    what = f"re-initialised for {new} classes" if new else "dropped (the model has none)"
    note = (f"{source or 'the checkpoint'}: classifier {what}, the checkpoint's has {sd[weight].shape[0]}; all "
            "other weights loaded")
    kept = {k: v for k, v in sd.items() if k not in keys}
    return {**kept, **{k: own[k] for k in keys if k in own}}, note


def load_state(model: nn.Module, sd: Mapping[str, Tensor], source: Optional[PathLike] = None,
               num_classes_given: bool = False) -> nn.Module:
    """Load a state dict (as :func:`model_state_dict` gives it; of the file ``source``, named in messages)
    strictly into ``model``. ``num_classes_given``: the caller chose the model's class count, so a classifier
    of another size is re-initialised (:func:`with_new_classifier`; a warning says so).

    Raises:
        CheckpointError: the weights do not fit (see :func:`check_state_dict`).
    """
    sd, note = with_new_classifier(model, sd, source) if num_classes_given else (sd, None)
    check_state_dict(model, sd, source=source)
    model.load_state_dict(sd, strict=True)
    if note:
        warnings.warn(note, stacklevel=2)
    return model


def load_weights(model: nn.Module, source: PathLike | Mapping[str, Any], *, num_classes_given: bool = False
                 ) -> nn.Module:
    """Load weights strictly from a file or checkpoint object (wrapper prefixes removed, official ones
    converted); ``num_classes_given``: see :func:`load_state`.

    Raises:
        NotFoundError, CheckpointError: an unreadable file (:func:`read_checkpoint`), or weights that do not fit.
    """
    is_file = isinstance(source, (str, Path))
    name = source if is_file else None
    sd = model_state_dict(read_checkpoint(source) if is_file else source, name)
    return load_state(model, sd, name, num_classes_given)
