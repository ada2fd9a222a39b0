"""When a path of the binary term must not run: what picks or refuses a path before any work is done.

* :func:`check_reference_memory`: the reference path's ``(HW)^2`` logits must fit in the free memory;
* :func:`syncs_batch_stats`: a SyncBatchNorm's cross-process statistics come only from the reference path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .bn_moments import uses_batch_stats


def check_reference_memory(q: Tensor, terms: int) -> None:
    """Refuse, before allocating, a reference-path logit tensor ``(N, terms * G, HW, HW)`` larger than the
    memory that is free on its device, naming the fused path that needs none of it."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    n, g, num, _ = q.shape
    needed = terms * n * g * num * num * q.element_size()
    free = free_memory(q.device)
    if free is not None and needed > free:
        raise ConfigError(
            f"impl='reference' would materialise {n}x{terms * g}x{num}x{num} attention logits ({needed / 2**30:.1f} "
            f"GiB) with {free / 2**30:.1f} GiB free on {q.device.type}: use impl='fused' (or 'auto'), the same "
            "function without the (HW)^2 matrix, or a smaller input / batch")


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on ``device`` (``None`` where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def syncs_batch_stats(*norms: nn.Module) -> bool:
    """Whether one of ``norms`` is a :class:`torch.nn.SyncBatchNorm` taking batch statistics (training; a
    frozen one, as in the detection backbone, takes its running statistics) over more than one process
    (``convert_sync_batchnorm`` under DDP): only the reference path, which calls the modules, gives those; the
    fused paths compute the logits' and outputs' BN moments of the local batch."""
    sync = [bn for bn in norms if isinstance(bn, nn.SyncBatchNorm) and uses_batch_stats(bn)]
    if not sync or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return any(torch.distributed.get_world_size(bn.process_group) > 1 for bn in sync)
