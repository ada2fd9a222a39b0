"""Any weights file lesa reads, and loading weights into models with errors that name what did not fit.

One reader for every kind of file (:func:`read_weights`): a lesa run (its directory, ``best.pt`` / ``last.pt``),
a weights file that describes its run (the shipped ``NAME.TAG`` files and those ``tools/ship_pretrained.py``
writes), the authors' checkpoint (official LESA layout, converted on reading) and a bare or wrapped state dict
(DDP's ``module.``, a LightningModule's attribute). Tasks, analysis, ``convert`` and ``export`` ask it what a
file is (:class:`WeightsFile`) instead of inspecting the loaded object themselves.
"""
from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar

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

Kind = Literal["run", "described", "official", "state_dict"]
T = TypeVar("T")

# What to do with each task's runs, for errors that meet a run of another task.
COMMANDS_OF = {
    "classification": "use `lesa eval` / `lesa analyze` (or --pretrained-backbone to initialise a detector from it)",
    "detection": "use `lesa det eval` / `lesa det predict`",
}


def commands_of(task: str) -> str:
    """What to do with a run of ``task`` (a task not listed: its own commands)."""
    return COMMANDS_OF.get(task, f"use the commands of {task} runs")


def is_run(obj: Any) -> bool:
    """A lesa training checkpoint: the model's weights with the epoch that wrote them (and the rest of the
    training state)."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "epoch" in obj


def run_kind(state: dict[str, Any]) -> str:
    """The task of a training checkpoint: its ``kind`` (checkpoints from before the field: detection where
    the config names a backbone, else classification)."""
    if "kind" in state:
        return state["kind"]
    return "detection" if "backbone" in state.get("config", {}) else "classification"


@dataclass
class WeightsFile:
    """What :func:`read_weights` found in a file.

    Attributes:
        source: the path or name as given (messages name it).
        path: the file read (a run directory's ``best.pt`` / ``last.pt``, a tagged name's shipped file).
        kind: ``'run'`` (a lesa training checkpoint), ``'described'`` (weights whose safetensors metadata names
            the model, input size and classes), ``'official'`` (the authors' layout), ``'state_dict'``.
        task: the task the weights were trained for where the file says (``'classification'`` /
            ``'detection'``), else ``None``.
        contents: the object as read (for a run: the whole training checkpoint).
    """

    source: str
    path: Path
    kind: Kind
    task: Optional[str]
    contents: Any

    @cached_property
    def state_dict(self) -> dict[str, Tensor]:
        """The model's weights in lesa's layout (see :func:`model_state_dict`)."""
        return model_state_dict(self.contents, self.source)

    @property
    def checkpoint(self) -> dict[str, Any]:
        """The training checkpoint of a run.

        Raises:
            CheckpointError: the file holds weights only.
        """
        if self.kind != "run":
            of = f" (a {self.config['model']}'s, which `lesa eval` takes)" if self.config.get("model") else ""
            raise CheckpointError(f"{self.source} holds weights only{of}, not a training checkpoint of a lesa run: "
                                  "pass the run's directory, or its last.pt / best.pt")
        return self.contents

    @property
    def config(self) -> dict[str, Any]:
        """The run's configuration as far as the file records it: a run's options with its ``classes`` and
        ``data_identity``; a described file's ``model``, ``img_size``, ``classes`` (and ``data``); else ``{}``."""
        if self.kind == "described":
            from .models.pretrained import file_description

            return file_description(self.path) or {}
        if self.kind != "run":
            return {}
        cfg = dict(self.contents.get("config", {}))
        if self.contents.get("data_identity"):
            cfg["data_identity"] = self.contents["data_identity"]
        if self.contents.get("classes") is not None:
            cfg["classes"] = list(self.contents["classes"])
        return cfg

    def require_task(self, task: str) -> WeightsFile:
        """``self``, where the file is not a run of another task.

        Raises:
            CheckpointError: a run of another task, with the commands that take it.
        """
        if self.task is not None and self.task != task:
            raise CheckpointError(f"{self.source} is a {self.task} run, not a {task} run: {commands_of(self.task)}")
        return self


def read_weights(source: PathLike, *, task: Optional[str] = None, run: bool = False, mmap: bool = False
                 ) -> WeightsFile:
    """Read any weights file lesa takes and say what it is.

    Args:
        source: a file, a run directory (its ``best.pt``, else ``last.pt``) or a tagged shipped name
            (``lesa_resnet_tiny.fashion_mnist``).
        task: refuse a run of another task (:meth:`WeightsFile.require_task`).
        run: refuse anything but a lesa training checkpoint.
        mmap: map the tensors instead of reading them (to look at a large checkpoint's other entries).

    Raises:
        NotFoundError, CheckpointError: see :func:`read_checkpoint`; a run of another task; weights only
            where ``run``.
    """
    from .models.pretrained import file_description

    path = checkpoint_file(source)
    contents = read_checkpoint(path, mmap=mmap)
    if is_run(contents):
        found = WeightsFile(str(source), path, "run", run_kind(contents), contents)
    elif file_description(path) is not None:
        found = WeightsFile(str(source), path, "described", "classification", contents)
    else:
        found = WeightsFile(str(source), path, "official" if _official(contents) else "state_dict", None, contents)
    if run:
        found.checkpoint  # noqa: B018 - raises for weights only
    return found.require_task(task) if task else found


def _official(contents: Any) -> bool:
    """Weights in the authors' layout (wrapped or not); anything that holds no state dict is not."""
    try:
        return is_official_state_dict(unwrap_state_dict(contents))
    except CheckpointError:  # named when the weights are asked for (WeightsFile.state_dict)
        return False


def read_checkpoint(path: PathLike, mmap: bool = False) -> Any:
    """Load a torch checkpoint (``weights_only=True``: pickled code is never run) or a ``.safetensors``
    file; a directory means its ``best.pt`` (else ``last.pt``). ``mmap``: tensors mapped, not read, where the
    file's format allows it.

    Whatever is wrong with the file (missing, a name the system refuses, empty, truncated, not a checkpoint,
    or carrying code) raises one :class:`~lesa.errors.CheckpointError` / :class:`~lesa.errors.NotFoundError`
    naming it.
    """
    path = checkpoint_file(path)
    size = _readable(path, lambda: path.stat().st_size)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), probably an interrupted copy: copy the file again")
    with open(path, "rb") as f:
        head = f.read(16)
    if is_safetensors(head, size):
        return _read_safetensors(path)
    try:
        return _torch_load(path, mmap)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # a class or function to import and call: code
            what = _unsafe_global(str(err))
            raise CheckpointError(
                f"{path} holds pickled Python objects{what} besides tensors, which lesa never loads (they can "
                "run code): in the environment that wrote it, save the tensors alone (torch.save(model.state_dict(),"
                " ...)) or convert it to .safetensors") from None
        # torch's own text is about weights_only; what helps is what the file is
        found = _first_line(err) if head.startswith(b"PK") else f"its {size} bytes start with {head[:8]!r}"
        raise CheckpointError(f"{path} is not a torch checkpoint or safetensors file ({found}): check the file "
                              "name, or copy the file again") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        # a text or other non-pickle file makes the unpickler fail with any of these
        what = "truncated or corrupt" if head.startswith(b"PK") else "not a torch checkpoint"
        raise CheckpointError(f"{path} is {what} ({_first_line(err)}): copy the file again, or pass another "
                              "checkpoint") from None


def _torch_load(path: Path, mmap: bool) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # torch's legacy (pre-zip) format cannot be mapped: read it
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def _readable(path: PathLike, look: Callable[[], T]) -> T:
    """``look()`` at the file system, its errors named as the reader's: a missing file stays a NotFoundError (itself
    an OSError, already naming the path); a name too long, a folder without permission, ... a CheckpointError."""
    try:
        return look()
    except NotFoundError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}): check the path") from None


def checkpoint_file(source: PathLike) -> Path:
    """The file a checkpoint argument names: ``source`` itself, the ``best.pt`` (else ``last.pt``) of a run
    directory, or the shipped weights of a tagged model name (``lesa_resnet_tiny.fashion_mnist``).

    Raises:
        NotFoundError: there is none. CheckpointError: the name cannot be looked up (too long, no permission).
    """
    return _readable(source, lambda: _checkpoint_file(Path(source)))


def _checkpoint_file(path: Path) -> Path:
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
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointError as err:
        if source is None:
            raise
        raise CheckpointError(f"{source}: {err}") from None
    sd = strip_attribute_prefix(strip_wrapper_prefixes(sd, source), source)
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
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            lines.append(f"{title} ({len(keys)}): {', '.join(keys[:5])}{more}")
    lines += _misfit_advice(model, sd, missing, unexpected, mis_shaped)
    if dtypes:
        lines.append("integer tensors where the model has floating-point ones: re-export the weights as float")
    raise CheckpointError("; ".join(lines))


def _misfit_advice(model: nn.Module, sd: Mapping[str, Tensor], missing: list[str], unexpected: list[str],
                   mis_shaped: list[str]) -> list[str]:
    """The fix for the kinds of misfit :func:`check_state_dict` knows (one line each)."""
    advice = []
    tables = [k for k in model.state_dict() if ".rel_pos." in k]
    other = [k for k in missing + unexpected if ".rel_pos." not in k]
    if other or (not tables and any(".rel_pos." in k for k in unexpected)):
        # layers differ, not a size: the weights are of another architecture or operator
        return ["the weights are of another model: build the one they were trained as (create_model(NAME, "
                "checkpoint_path=...), --model NAME)"]
    if any(".rel_pos." in k for k in missing + unexpected):
        kind = "rel2d" if any(k.endswith("rel_pos.height") for k in sd) else "flat"
        advice.append(f"the position tables are {kind!r} ones: build the model with pos_embed={kind!r} "
                      f"(--pos-embed {kind})")
    weight = _classifier_keys(model)[:1]
    if weight and weight[0] in mis_shaped and sd[weight[0]].shape[0] != model.state_dict()[weight[0]].shape[0]:
        old, new = sd[weight[0]].shape[0], model.state_dict()[weight[0]].shape[0]
        advice.append(f"the checkpoint's classifier has {old} classes and the model's {new}: build the model with "
                      f"num_classes={old}, or pass num_classes={new} to load the rest and re-initialise the "
                      "classifier (create_model(..., num_classes=N, checkpoint_path=...), `lesa train --init`)")
    if any(".rel_pos." in k for k in mis_shaped):
        sizes = tables_img_sizes(model, sd, [k for k in mis_shaped if ".rel_pos." in k][0])
        if not sizes:
            advice.append("the position tables are of another input size: build the model with the checkpoint's "
                          "img_size (--img-size)")
        else:
            trained = f"img_size {sizes[0]}" if len(sizes) == 1 else f"an img_size from {sizes[0]} to {sizes[-1]}"
            advice.append(f"the position tables were trained at {trained}: build the model with img_size={sizes[-1]}"
                          f" (--img-size {sizes[-1]})" + (" or the size it was trained at" if len(sizes) > 1 else ""))
        advice.append("or resize the tables with lesa.resize_pos_embed (flat=True for 'flat' ones)")
    return advice


def tables_img_sizes(model: nn.Module, sd: Mapping[str, Tensor], key: str) -> Optional[range]:
    """The input sizes the position table ``key`` of ``sd`` fits, from the model's own (None: a model that does not
    record its size, or a table of no whole map): a 'flat' table spans 2*H*W - 1 offsets of a square H x W map, a
    'rel2d' one 2*H - 1; a map of side H comes from any input of ``(H-1)*stride + 1 .. H*stride`` pixels."""
    img_size = getattr(model, "img_size", None)
    if not img_size:
        return None

    def side(shape: tuple[int, ...]) -> float:
        return (((shape[-1] + 1) / 2) ** 0.5) if key.endswith("relative") else (shape[0] + 1) / 2

    own, theirs = side(tuple(model.state_dict()[key].shape)), side(tuple(sd[key].shape))
    if theirs != round(theirs) or own != round(own) or theirs < 1:
        return None
    stride = 2 ** round(math.log2(img_size[0] / own))  # the map is ceil(input / stride) a side
    return range((round(theirs) - 1) * stride + 1, round(theirs) * stride + 1)


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
    if any(p.is_meta for p in model.parameters()):
        # a model built on the meta device (device='meta') has no storage to copy into: it takes the tensors,
        # in its own dtypes (as copying would give them)
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True, assign=True)
        for module in model.modules():  # a re-initialised classifier was taken from the model: still no storage
            if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                device = next((t.device for t in sd.values() if not t.is_meta), torch.device("cpu"))
                module.to_empty(device=device, recurse=False)
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    else:
        model.load_state_dict(sd, strict=True)
    if note:
        warnings.warn(note, stacklevel=3)
    return model


def load_weights(model: nn.Module, source: PathLike | Mapping[str, Any], *, num_classes_given: bool = False
                 ) -> nn.Module:
    """Load weights strictly from a file or checkpoint object (wrapper prefixes removed, official ones
    converted); ``num_classes_given``: see :func:`load_state`.

    Raises:
        NotFoundError, CheckpointError: an unreadable file (:func:`read_weights`), or weights that do not fit.
    """
    if isinstance(source, (str, Path)):
        return load_state(model, read_weights(source).state_dict, source, num_classes_given)
    return load_state(model, model_state_dict(source), None, num_classes_given)
