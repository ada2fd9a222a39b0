"""Training checkpoints: everything needed to continue a run exactly, written atomically."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import CheckpointError
from ..utils import atomic_write
from ..weights import read_checkpoint


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
    """A training checkpoint (``last.pt`` / ``best.pt``), read safely (see :func:`lesa.weights.read_checkpoint`);
    with ``kind``, one of that kind of run (``'classification'`` / ``'detection'``)."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "epoch" not in state:
        raise CheckpointError(f"{path} holds weights only, not a training checkpoint of a lesa run (last.pt / best.pt)")
    if kind is not None and run_kind(state) != kind:
        raise CheckpointError(f"{path} is a {run_kind(state)} run, not a {kind} run: {commands_of(run_kind(state))}")
    return state


# What to do with each kind of run, for errors that meet the other kind.
COMMANDS_OF = {
    "classification": "use `lesa eval` / `lesa analyze` (or --pretrained-backbone to initialise a detector from it)",
    "detection": "use `lesa det eval` / `lesa det predict`",
}


def commands_of(kind: str) -> str:
    """What to do with a run of ``kind`` (a task the engine does not list: its own commands)."""
    return COMMANDS_OF.get(kind, f"use the commands of {kind} runs")


def run_kind(state: dict[str, Any]) -> str:
    """``'classification'`` or ``'detection'`` (checkpoints from before the field: from their config)."""
    if "kind" in state:
        return state["kind"]
    return "detection" if "backbone" in state.get("config", {}) else "classification"
