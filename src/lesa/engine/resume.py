"""Resuming a run: the checkpoint's task, options, classes and data must be this command's (a run moved with its
data, or its data moved alone, is found by fingerprint: :mod:`lesa.engine.run_data`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import CheckpointError, ConfigError, DataError
from ..options import flag
from ..weights import run_kind
from .config import RunConfig
from .run_data import describe, difference
from .task import Task


def check_resume(state: dict[str, Any], cfg: RunConfig, task_cls: type[Task]) -> None:
    """A resumed run is of the same kind and shares the options that shape its model and data."""
    if run_kind(state) != task_cls.kind:
        raise CheckpointError(f"--resume: {cfg.output_dir} holds a {run_kind(state)} run, not a {task_cls.kind} "
                              "run; choose another --output")
    saved = state.get("config", {})
    differ = []
    for key in task_cls.resume_keys:
        if key == "data" and moved_data(state, getattr(cfg, key)):
            continue  # compared by identity once the task has listed it (check_same_data)
        if key in saved and not task_cls.same_setting(key, saved[key], getattr(cfg, key)):
            differ.append(key)
    if differ:
        run = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        this = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in differ)
        raise ConfigError(f"--resume: the run in {cfg.output_dir} has {run}, this command {this}; resume with the "
                          f"run's settings ({', '.join(_as_flags(k, saved[k], state, cfg) for k in differ)}; a resumed "
                          "run keeps its own where neither the command line, a preset nor a --config file gives "
                          "one)")


def _as_flags(key: str, value: Any, state: dict[str, Any], cfg: RunConfig) -> str:
    """How the command line gives ``key`` its saved ``value``: ``--img-size 24``, ``--heads 4 --pos-embed rel2d``
    (a mapping of layer options), ``no --train-subset`` (none)."""
    if key == "data":
        value = resume_data(state, cfg.output_dir)
    if value is None:
        return f"no {flag(key)}"
    if isinstance(value, dict):
        return " ".join(f"{flag(k)} {v}" for k, v in value.items()) or f"no {flag(key)}"
    if isinstance(value, (list, tuple)):
        return f"{flag(key)} {' '.join(map(str, value))}"
    return f"{flag(key)} {value}"


def moved_data(state: dict[str, Any], data: Any) -> bool:
    """Whether ``data`` is a folder that may be the run's data moved: the run has a fingerprint to compare."""
    saved = state.get("data_identity") or {}
    return bool(saved.get("fingerprints")) and isinstance(data, str) and Path(data).is_dir()


def resume_data(state: dict[str, Any], out: Path) -> str:
    """The ``--data`` to resume with: the run's data where it is found from here (:func:`run_data.locate`:
    relative to the run folder, then the stored path), else the stored path."""
    saved = state.get("data_identity") or {}
    data = str(state.get("config", {}).get("data"))
    if not saved.get("relative") or not saved.get("fingerprints"):
        return data
    candidate = Path(out) / saved["relative"]
    return str(candidate.resolve()) if candidate.is_dir() else data


def check_same_data(saved: Optional[dict[str, Any]], current: dict[str, Any], out: Path) -> None:
    """A resumed run given its data in another place meets the same files (fingerprints of every split).

    Raises:
        DataError: other data, with how it differs and the fix.
    """
    if not saved or not saved.get("fingerprints"):
        return
    common = [s for s in saved["fingerprints"] if s in current.get("fingerprints", {})]
    if common and all(saved["fingerprints"][s] == current["fingerprints"][s] for s in common):
        return
    now = "now holds" if saved.get("data") == current.get("data") else f"and --data {current['data']} holds"
    raise DataError(f"--resume: the run in {out} was trained on {saved['data']}{describe(saved)}, {now} other data "
                    f"({difference(saved, current)}); resume with the run's data, or start a new run with another "
                    "--output")


def check_same_classes(saved: Optional[list[str]], current: Optional[list[str]], out: Path) -> None:
    """A resumed run meets the classes it was trained on, by name and in order (a checkpoint from before
    classes were stored has none to compare).

    Raises:
        DataError: classes added, removed, renamed or reordered since the run started.
    """
    if saved is None or current is None or list(saved) == list(current):
        return
    added, missing = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if not added and not missing:
        change = "the same classes in another order"
    else:
        change = f"classes added: {added[:5] or 'none'}; missing: {missing[:5] or 'none'}"
    raise DataError(f"--resume: the run in {out} was trained on {len(saved)} classes and the data now has "
                    f"{len(current)} ({change}); resume with the run's data, or start a new run with another --output")
