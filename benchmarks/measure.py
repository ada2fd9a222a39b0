"""The measurement every benchmark worker process shares: a memory cap, warm-up, timed steps, peak memory.

Peak memory is that of the calling process alone (each configuration runs in its own): on CPU the growth
of the maximum resident set size over what was there before the first step (model and input already
built), on CUDA ``torch.cuda.max_memory_allocated`` over what was allocated then. A step that would need
more than the cap set by :func:`cap_memory` fails and is reported as out of memory.
"""
from __future__ import annotations

import resource
import time
from typing import Callable


def cap_memory(max_gb: float) -> None:
    """Limit the process's data segment, so that a configuration too large for the machine stops with an
    out-of-memory error instead of swapping (call before importing torch)."""
    limit = int(max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def measure(step: Callable[[], None], device: str, warmup: int, iters: int) -> dict:
    """Run ``step`` ``warmup`` times, then ``iters`` timed times (synchronising CUDA around each).

    Returns ``dict(status="ok", times=[seconds...], peak_mib=...)`` or, when a step runs out of memory,
    ``dict(status="out of memory", error=first line of the error)``; other errors propagate.
    """
    import torch

    cuda = device == "cuda" or device.startswith("cuda:")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    try:
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return dict(status="out of memory", error=str(err).splitlines()[0][:200] if str(err) else "MemoryError")
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return dict(status="ok", times=times, peak_mib=peak)
