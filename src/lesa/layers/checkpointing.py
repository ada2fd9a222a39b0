"""Gradient checkpointing that does not count BatchNorm statistics twice.

The official ``with_cp`` recomputes the unary and binary terms in the backward pass; a plain
``torch.utils.checkpoint`` then updates every BatchNorm's running statistics a second time. Here the
recomputation restores them afterwards, so a checkpointed layer ends a step with the same running
statistics as an uncheckpointed one. Under ``torch.compile`` the buffer updates are functionalised and
applied once, whatever is recomputed, so the plain checkpoint serves (and is captured whole).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _restore_bn_buffers(module: nn.Module):
    saved = [
        (buf, buf.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        for buf, value in saved:
            buf.copy_(value)


def checkpointed(module: nn.Module, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn(*args)`` under non-reentrant checkpointing; ``module``'s BN buffers survive the recompute."""
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _restore_bn_buffers(module)),
    )
