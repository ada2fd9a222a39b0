"""The argument and input checks of every public layer and builder, in one place.

A bad argument raises :class:`~lesa.errors.ConfigError` at construction, on one line that names the argument
as the caller wrote it, the value and the fix; nothing is coerced (``heads=4.0`` or ``heads=True`` is refused,
not read as 4 or 1). A bad forward input raises :class:`~lesa.errors.InputError` (a ``ConfigError``) in eager
mode and under torch.compile / torch.export, where shapes, dtypes and devices are known when the graph is
built, so the checks cost nothing at run time; TorchScript and torch.fx graphs keep the shape checks as
``torch._assert`` (see :func:`graph_mode`).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.fx
from torch import Tensor

from ..errors import ConfigError, InputError


def describe(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line and at most ``limit`` characters (a message must stay one line)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    """A real integer: ``int`` or a NumPy integer, not ``bool`` (``True`` is an int to Python, not to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_fix(name: str, value: Any) -> str:
    """How to pass ``value`` as an int, for a message."""
    if isinstance(value, float) and value.is_integer():
        return f"pass {name}={int(value)}"
    if isinstance(value, bool):
        return f"pass a number, not {value}"
    if isinstance(value, (list, tuple)) and len(value) == 1 and is_int(value[0]):
        return f"pass {name}={value[0]}, not a sequence"
    return "pass one int"


def check_int(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None, hint: str = "") -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``.

    Raises:
        ConfigError: ``value`` is not an int (a ``bool`` or a float, even ``4.0``, is not) or out of range;
            ``hint`` (what the argument means) is added to the message.
    """
    note = f" ({hint})" if hint else ""
    if not is_int(value):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {describe(value)}{note}: "
                          f"{int_fix(name, value)}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(f"{name} must be {bounds}, got {value}{note}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None,
                       hint: str = "") -> Optional[int]:
    """:func:`check_int`, with ``None`` (the default) passed through."""
    return None if value is None else check_int(name, value, minimum, maximum, hint)


def check_ints(name: str, values: Any, minimum: int = 1, maximum: Optional[int] = None,
               hint: str = "") -> tuple[int, ...]:
    """A sequence of ints each in ``[minimum, maximum]`` (e.g. ``dcn_stages``), as a tuple.

    Raises:
        ConfigError: ``values`` is not a list / tuple, or one of its items fails :func:`check_int`.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"{name} must be a list of ints, got {describe(values)}: pass e.g. {name}=(2, 3)")
    return tuple(check_int(f"{name}[{i}]", v, minimum, maximum, hint) for i, v in enumerate(values))


def check_size2d(name: str, value: Any, hint: str = "") -> tuple[int, int]:
    """A map or image size: an int >= 1 or an ``(H, W)`` pair of them, as ``(H, W)``.

    Raises:
        ConfigError: anything else (a float, a bool, a size < 1, a sequence of another length).
    """
    if is_int(value):
        size = check_int(name, value, hint=hint)
        return size, size
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ConfigError(f"{name} must be an int or an (H, W) pair of ints, got {describe(value)}: "
                          f"pass e.g. {name}=14 or {name}=(14, 20)")
    return check_int(f"{name}[0]", value[0], hint=hint), check_int(f"{name}[1]", value[1], hint=hint)


def check_float(name: str, value: Any, low: float, high: float, hint: str = "") -> float:
    """A real number in the half-open interval ``[low, high)``.

    Raises:
        ConfigError: ``value`` is not a real number (a bool is not) or lies outside ``[low, high)``.
    """
    note = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number in [{low}, {high}), got {describe(value)}{note}")
    if not low <= value < high:
        raise ConfigError(f"{name} must be in [{low}, {high}), got {value}{note}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """A flag: ``True`` or ``False`` only (``'no'`` would be truthy).

    Raises:
        ConfigError: anything but a bool.
    """
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {describe(value)}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises :class:`ConfigError` unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={describe(value)} is not supported; choose one of {', '.join(map(repr, choices))}")


def check_divisible(name: str, value: int, by_name: str, by: int, why: str) -> None:
    """Raises :class:`ConfigError` unless ``by`` divides ``value`` (``why``: what needs it)."""
    if value % by != 0:
        raise ConfigError(f"{name}={value} must be divisible by {by_name}={by} ({why})")


# -- forward inputs ---------------------------------------------------------------------------------------------
def graph_mode(x: Tensor) -> str:
    """How a layer is being run, where graph capture cannot take what eager PyTorch can:

    * ``'symbolic'``: torch.fx symbolic tracing (``x`` is a proxy: no shapes for Python control flow) or
      ``torch.jit.trace`` (which freezes it and cannot record custom autograd functions): the reference path;
    * ``'compile'``: ``torch.compile`` / ``torch.export``: the chosen path, fused ones in capturable forms;
    * ``'eager'``.

    TorchScript does not call this: scripted layers take their ``torch.jit.is_scripting()`` branch.
    """
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
        return "symbolic"
    if torch.compiler.is_compiling():
        return "compile"
    return "eager"


def assert_input(x: Tensor, in_channels: int, layer: str, arg: str = "in_channels") -> None:
    """:func:`check_input` inside TorchScript / torch.fx graphs, as ``torch._assert`` (shape checks only: a
    graph fixes neither dtype nor device)."""
    torch._assert(x.dim() == 4, f"{layer} expects a 4-D (N, C, H, W) input: pass images as one batch tensor")
    torch._assert(x.shape[1] == in_channels,
                  f"{layer} was built with {arg}={in_channels}: pass an (N, {in_channels}, H, W) input, or "
                  "build it for the input's channels")


def check_input(x: Tensor, in_channels: int, layer: str, param: Tensor, arg: str = "in_channels") -> None:
    """Refuse an input that ``layer`` cannot take: not ``(N, in_channels, H, W)`` with ``H, W >= 1``, not of
    ``param``'s floating dtype (any floating dtype under autocast) or not on ``param``'s device. An empty
    batch (``N = 0``) is fine. ``arg``: the constructor argument that set the channels, for the message.

    Raises:
        InputError: in eager mode and under torch.compile / torch.export (checked while tracing, free at
            run time); TorchScript and torch.fx graphs check the shape with ``torch._assert``.
    """
    if torch.jit.is_scripting():
        assert_input(x, in_channels, layer, arg)
        return
    if graph_mode(x) == "symbolic":
        assert_input(x, in_channels, layer, arg)
        return
    if not isinstance(x, Tensor):
        raise InputError(f"{layer} expects a tensor, got {type(x).__name__}: pass an (N, {in_channels}, H, W) "
                         "torch.Tensor")
    check_shape(x, in_channels, layer, arg)
    check_dtype(x, param, layer)
    if x.device != param.device:
        if param.is_meta:  # built without storage: it is given some (and its weights), not moved
            raise InputError(f"{layer} got an input on {x.device} but its parameters are on meta, a device without "
                             f"storage: give it storage and weights (model.to_empty(device='{x.device}') then load "
                             f"a state dict), or build it on '{x.device}'")
        raise InputError(f"{layer} got an input on {x.device} but its parameters are on {param.device}: move "
                         f"the input (x.to('{param.device}')) or the model (model.to('{x.device}'))")


def check_shape(x: Tensor, in_channels: int, layer: str, arg: str) -> None:
    if x.dim() != 4:
        raise InputError(f"{layer} expects a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}: pass images "
                         "as one batch (x.unsqueeze(0) for a single image)")
    if x.shape[1] != in_channels:
        raise InputError(f"{layer} was built with {arg}={in_channels} but the input has {x.shape[1]} "
                         f"channels (shape {tuple(x.shape)}): pass (N, {in_channels}, H, W) inputs or build it for "
                         "the input's channels")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise InputError(f"{layer} got an empty {x.shape[2]}x{x.shape[3]} map (shape {tuple(x.shape)}): H and W "
                         "must be >= 1 (an empty batch, N = 0, is fine)")


# The usual spelling of casting a model to an input's dtype.
MODEL_CASTS = {torch.float64: "model.double()", torch.float32: "model.float()", torch.float16: "model.half()",
               torch.bfloat16: "model.bfloat16()"}


def check_dtype(x: Tensor, param: Tensor, layer: str) -> None:
    if x.dtype == param.dtype:
        return
    if not x.is_floating_point():
        raise InputError(f"{layer} got a {x.dtype} input but its parameters are {param.dtype}: convert the input "
                         f"with x.to({param.dtype}) (integer images: scaled to floats as in training)")
    if autocasting(x.device.type):  # autocast casts each op's inputs itself
        return
    raise InputError(f"{layer} got a {x.dtype} input but its parameters are {param.dtype}: convert the input "
                     f"(x.to({param.dtype})) or the model ({MODEL_CASTS.get(x.dtype, f'model.to({x.dtype})')})")


def autocasting(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (torch < 2.4 only knows CUDA and CPU)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        cpu = device_type == "cpu"
        return torch.is_autocast_cpu_enabled() if cpu else device_type == "cuda" and torch.is_autocast_enabled()
