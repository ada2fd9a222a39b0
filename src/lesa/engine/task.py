"""What a task supplies to the engine and what it gets from it: the :class:`Task` interface, a step's
:class:`Step`, the :class:`Runtime` its steps run in (device, mixed precision, memory format), the per-step
learning-rate schedules, evaluation sharding (:class:`ShardSampler`) and the count of undecodable training
images (:class:`SkippedImages`)."""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler, default_collate

from ..errors import ConfigError, DataError
from .distributed import DistContext


# -- what a task's step gets ---------------------------------------------------------------------
class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``: each sample evaluated exactly once across processes."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Precision:
    dtype: Optional[torch.dtype]  # autocast dtype, None: full precision
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def choose_precision(amp: str, device: torch.device) -> Precision:
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "none"
    if amp == "none":
        return Precision(None, None)
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp=fp16 needs a CUDA device; use --amp bf16 or --amp none on CPU")
        return Precision(torch.float16, torch.amp.GradScaler("cuda"))
    return Precision(torch.bfloat16, None)


@dataclass
class Runtime:
    """Where and how a task's steps run (set up by the engine)."""

    ctx: DistContext
    precision: Precision = field(default_factory=lambda: Precision(None, None))
    channels_last: bool = False
    quiet: bool = True

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the engine's memory format."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine to 0, per step (the authors' classification schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_multistep(step: int, warmup_steps: int, milestones: list[int], warmup_ratio: float) -> float:
    """Linear warm-up from ``warmup_ratio``, then divided by 10 at each milestone (mmdetection's schedule)."""
    factor = 0.1 ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        factor *= warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    return factor


@dataclass
class Step:
    """One training step's result: the loss to back-propagate, the number of samples it weighs (for the
    epoch means) and the statistics to average into the epoch row (their final column names)."""

    loss: torch.Tensor
    weight: float
    stats: dict[str, float]


# -- the task interface ---------------------------------------------------------------------------------
class Task(ABC):
    """What a kind of training supplies to the :class:`Engine`.

    A task builds its ``model`` and ``train_set`` in its constructor (called with the config and the
    distributed context after seeding, so every process starts from the same weights) and implements
    the abstract methods. ``kind`` is written into checkpoints, so that a command meeting another kind
    of run says so; ``best_metric`` is the column of the epoch row that picks ``best.pt`` (higher is
    better); ``columns`` are those of ``metrics.csv``; ``resume_keys`` the options a resumed run must share
    with the saved one.
    """

    kind: ClassVar[str]
    best_metric: ClassVar[str]
    columns: ClassVar[list[str]]
    resume_keys: ClassVar[tuple[str, ...]]
    model: nn.Module
    train_set: Dataset

    @classmethod
    def same_setting(cls, key: str, saved: Any, current: Any) -> bool:
        """Whether a resumed run's saved ``key`` (one of ``resume_keys``) agrees with this command's value."""
        return saved == current

    def collate(self, batch: list) -> Any:
        return default_collate(batch)

    @abstractmethod
    def lr_schedule(self, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
        """The learning-rate factor of each optimizer step."""

    @abstractmethod
    def train_step(self, net: nn.Module, batch: Any, runtime: Runtime) -> Step:
        """Forward one batch (under ``runtime.precision.autocast``) and return its loss; no backward."""

    @abstractmethod
    def evaluate(self, net: nn.Module, runtime: Runtime) -> dict[str, float]:
        """The validation columns of the epoch row (the same in every process)."""

    @abstractmethod
    def describe(self, params: int) -> str:
        """One line on what is trained, printed at the start."""

    @abstractmethod
    def format_row(self, row: dict[str, float]) -> str:
        """One line on an epoch's results."""

    def summary(self, last: dict[str, float]) -> dict[str, Any]:
        """The task's own entries of ``summary.json``."""
        return {}

    def finish(self, net: nn.Module, runtime: Runtime) -> dict[str, Any]:
        """Once training is over (every process): final measurements for ``summary.json``, e.g. a test split
        reported only at the end. ``best.pt`` is written by then."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The task's entries of each checkpoint (e.g. class names, ``data_identity``) besides the engine's."""
        return {}

    def data_identity(self) -> dict[str, Any]:
        """What the run trains on (:mod:`lesa.engine.run_data`); ``{}``: nothing to compare on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` saved (on resume)."""

    def write_outputs(self, out_dir: Path, history: list[dict[str, float]]) -> None:  # noqa: B027 - optional hook
        """The task's own files in the run directory, after each epoch (main process only)."""


class SkippedImages:
    """The undecodable training images a task skipped, against ``--max-bad-fraction`` of its training set:
    counted from the first images on (a bad folder stops the run early), saved with the run (``state``)."""

    def __init__(self, max_fraction: float, train_images: int) -> None:
        self.max_fraction, self.train_images = max_fraction, train_images
        self.state = [0.0, 0.0]  # undecodable images, images read

    @property
    def count(self) -> int:
        return int(self.state[0])

    def add(self, bad: int, good: int) -> None:
        """Count a batch's ``bad`` and ``good`` images.

        Raises:
            DataError: the bad ones exceed the fraction of the training set (or of what was read, when more).
        """
        self.state[0] += bad
        self.state[1] += bad + good
        bad_total, seen = self.state
        if bad_total > self.max_fraction * max(seen, self.train_images):
            raise DataError(
                f"{int(bad_total)} of {int(seen)} images read so far could not be decoded, more than "
                f"max_bad_fraction={self.max_fraction} of the {self.train_images} training images; fix or remove "
                "them (the warnings name them), or raise --max-bad-fraction")
