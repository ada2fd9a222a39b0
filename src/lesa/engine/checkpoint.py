"""Training checkpoints: everything needed to continue a run exactly, written atomically."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..utils import atomic_write


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


def load_checkpoint(path: Path, map_location: Optional[str | torch.device] = "cpu") -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def open_run_dir(out: Path, resume: bool) -> Optional[dict[str, Any]]:
    """The state to resume from (``resume``), or ``None`` for a new run; never lets a new run overwrite
    an existing one."""
    last = Path(out) / "last.pt"
    if not resume:
        if last.exists():
            raise FileExistsError(f"{out} already holds a run (last.pt): pass --resume to continue it, or "
                                  "--output DIR for a new run")
        return None
    if not last.exists():
        raise FileNotFoundError(f"--resume: there is no {last} to continue from")
    return load_checkpoint(last)
