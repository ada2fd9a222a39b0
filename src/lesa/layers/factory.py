"""torch.nn's factory arguments for modules built of other modules.

``nn.Conv2d(..., device=, dtype=)`` creates its parameters where and as asked; a module made of torch.nn
modules would have to pass the two arguments to each of them. :func:`takes_factory_kwargs` gives a module's
``__init__`` the keyword-only ``device`` and ``dtype`` at once: while it builds, they are the default device
(``torch.device`` as a context) and the default floating dtype, so every parameter and buffer is created on
``device`` in ``dtype`` (``'meta'`` allocates nothing) and never copied afterwards, as torch.nn's own layers do.
Integer buffers (BatchNorm's ``num_batches_tracked``) keep their dtype.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any, Callable, Optional, TypeVar

import torch

from ..errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
DeviceLike = Optional[torch.device | str | int]
SHORT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


@contextlib.contextmanager
def factory_defaults(device: DeviceLike = None, dtype: Optional[torch.dtype | str] = None) -> Iterator[None]:
    """Within the block, tensors are created on ``device`` and floating ones in ``dtype`` (``None``: as before).
    ``dtype`` may be named (``'bfloat16'``, ``'torch.float64'``).

    Raises:
        ConfigError: ``dtype`` is not a floating-point dtype; ``device`` is not one torch knows or this machine has.
    """
    dtype = _floating_dtype(dtype)
    device = _usable_device(device)
    previous = torch.get_default_dtype()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def _floating_dtype(dtype: Any) -> Optional[torch.dtype]:
    if isinstance(dtype, str):  # a name, as configs and command lines give it (--amp's short names too)
        name = dtype.removeprefix("torch.")
        dtype = getattr(torch, SHORT_DTYPES.get(name, name), dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype={dtype!r}: a module's parameters need a floating-point dtype (torch.float32, "
                          "torch.float64, torch.bfloat16, torch.float16, or its name: 'bfloat16')")
    return dtype


def _usable_device(device: DeviceLike) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        found = torch.device(device)
        torch.empty(0, device=found)  # a device type this build lacks, or one absent from this machine, fails here
    except (RuntimeError, AssertionError, TypeError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if detail.startswith("Expected one of"):  # torch lists every device type it was ever built for
            detail = "not a device type torch knows"
        raise ConfigError(f"device={device!r} cannot be used here ({detail}): pass 'cpu', 'meta', or a device this "
                          "machine has ('cuda' where torch.cuda.is_available())") from None
    return found


def takes_factory_kwargs(init: F) -> F:
    """Give a module's ``__init__`` (or a function that builds modules) the keyword-only ``device`` and ``dtype`` of
    torch.nn (see the module docstring)."""

    @functools.wraps(init)
    def wrapped(*args: Any, device: DeviceLike = None, dtype: Optional[torch.dtype | str] = None, **kwargs: Any) -> Any:
        with factory_defaults(device, dtype):
            return init(*args, **kwargs)

    signature = inspect.signature(init)
    factory = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("device", "dtype")]
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    variadic = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    wrapped.__signature__ = signature.replace(parameters=params + factory + variadic)  # type: ignore[attr-defined]
    return wrapped  # type: ignore[return-value]
