"""Training checkpoints: everything needed to continue a run exactly, written atomically."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..utils import atomic_write
from ..weights import read_weights


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generator states as plain lists: they pickle between
    processes and load with ``weights_only=True``."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: a kill mid-write never corrupts ``path``."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, kind: Optional[str] = None) -> dict[str, Any]:
    """A training checkpoint (``last.pt`` / ``best.pt``), read by the one reader (:func:`lesa.weights.read_weights`);
    with ``kind``, one of that task's runs.

    Raises:
        NotFoundError, CheckpointError: an unreadable file, weights only, or a run of another task.
    """
    return read_weights(path, task=kind, run=True).checkpoint
