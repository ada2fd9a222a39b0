"""The one training loop: every task (classification, detection, ...) runs through :class:`Engine`.

A :class:`Task` supplies what differs between tasks: its model and training data, its learning-rate
schedule, one training step, the evaluation after each epoch, the metric that picks ``best.pt`` and its
own outputs. The engine owns the rest, identically for all: the run directory (lock, refusal to
overwrite, clean-up of interrupted writes), seeding, distributed data parallelism (torchrun), mixed
precision, channels-last, ``torch.compile``, the SGD optimizer and per-step schedule, the non-finite loss
guard, ``last.pt`` / ``best.pt`` (atomic), ``metrics.csv``, TensorBoard, ``summary.json`` and exact
resumption: every epoch reseeds all generators from ``(seed, epoch, rank)`` and shuffles with a sampler
seeded the same way, so a run resumed from ``last.pt`` retraces the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from ..options import flag
from ..ownership import make_folder
from ..utils import atomic_write, count_params
from ..weights import run_kind
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig
from .distributed import DistContext, cleanup_distributed, setup_distributed
from .records import TensorBoard, write_json, write_metrics_csv
from .run_data import describe, difference
from .run_dir import RunDir


# -- small pieces every task uses ---------------------------------------------------------------------
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


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


def all_finite(ctx: DistContext, loss: torch.Tensor) -> bool:
    """Whether the loss is finite in every process (all stop together)."""
    return ctx.all_reduce_sum([float(torch.isfinite(loss))])[0] == ctx.world_size


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, scaler=None) -> None:
    """Backward, step (through the fp16 gradient scaler if any) and advance the per-step schedule."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()


def unwrap(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)  # torch.compile


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


# -- the engine -------------------------------------------------------------------------------------------
class Engine:
    """One training run of ``task_cls`` as configured; ``run()`` returns the summary (see the module
    docstring for what it writes)."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, task_cls: Callable[[Any, DistContext], Task]) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = cfg.output_dir
        self.quiet = cfg.quiet or not ctx.is_main
        self.run_dir = RunDir(self.out, main=ctx.is_main)
        resume_state = self.run_dir.open(cfg.resume)
        try:
            self._setup(task_cls, resume_state)
        except BaseException:
            self.run_dir.close()
            raise

    def _setup(self, task_cls, resume_state: Optional[dict[str, Any]]) -> None:
        cfg, ctx = self.cfg, self.ctx
        if resume_state is not None:
            check_resume(resume_state, cfg, task_cls)
        seed_everything(cfg.seed)  # identical initial weights on every process
        self.task = task = task_cls(cfg, ctx)
        if resume_state is not None:
            check_same_classes(resume_state.get("classes"), task.state_dict().get("classes"), cfg.output_dir)
        self.params = count_params(task.model)
        channels_last = cfg.channels_last if cfg.channels_last is not None else ctx.device.type == "cuda"
        task.model.to(ctx.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.runtime = Runtime(ctx, choose_precision(cfg.amp, ctx.device), channels_last, self.quiet)
        self.train_sampler = DistributedSampler(task.train_set, ctx.world_size, ctx.rank, shuffle=True,
                                                seed=cfg.seed, drop_last=True)
        self.train_loader = DataLoader(task.train_set, batch_size=cfg.batch_size, sampler=self.train_sampler,
                                       num_workers=cfg.workers, collate_fn=task.collate,
                                       pin_memory=ctx.device.type == "cuda", persistent_workers=cfg.workers > 0)
        if len(self.train_loader) == 0:
            raise ConfigError(f"{len(task.train_set)} training images are fewer than one batch per process "
                              f"({cfg.batch_size} x {ctx.world_size}); lower --batch-size")
        self.steps_per_epoch = min(len(self.train_loader), cfg.max_steps_per_epoch or len(self.train_loader))
        self.epochs = cfg.total_epochs()
        self.lr = cfg.lr * cfg.batch_size * ctx.world_size / cfg.lr_base_batch
        params = [p for p in task.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=cfg.weight_decay)
        self.lr_factor = task.lr_schedule(self.steps_per_epoch, self.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.net: nn.Module = torch.compile(task.model) if cfg.compile else task.model
        if ctx.distributed:
            self.net = DistributedDataParallel(self.net, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)
        self.start_epoch, self.history, self.best = 0, [], -math.inf
        self.unevaluated: Optional[dict[str, float]] = None  # a resumed epoch whose evaluation did not finish
        self.config_written = False
        if resume_state is not None:
            self._restore(resume_state)  # the task's own checks of its data first (a category mapping, say)
            check_same_data(resume_state.get("data_identity"), task.data_identity(), cfg.output_dir)
            saved_data = (resume_state.get("data_identity") or {}).get("data")
            if ctx.is_main and saved_data is not None and saved_data != task.data_identity().get("data"):
                self.record_moved_data()
            if self.epochs < self.start_epoch:
                raise ConfigError(f"--resume: the run in {self.out} has trained {self.start_epoch} epochs and "
                                  f"--epochs {self.epochs} asks for fewer: pass --epochs {self.start_epoch} or more "
                                  "(more trains further)")

    def _restore(self, state: dict[str, Any]) -> None:
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows this command's --lr / --epochs (resuming with a lower lr is how one recovers
        # from a diverged run); with unchanged options this is the saved learning rate exactly.
        self.scheduler.base_lrs = [self.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * self.lr_factor(self.scheduler.last_epoch)
        scaler = self.runtime.precision.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = float(state.get("best", -math.inf))
        self.unevaluated = state.get("unevaluated")
        self.task.load_state_dict(state)
        rngs = state.get("rng") or []
        if self.ctx.rank < len(rngs):
            set_rng_state(rngs[self.ctx.rank])
        self.log(f"resuming {self.out} after epoch {self.start_epoch}")

    def record_moved_data(self) -> None:
        """The data moved (same files, another place): ``best.pt`` says where it is now, as ``last.pt`` will, so
        that either finds it (:mod:`lesa.engine.run_data`)."""
        best = self.out / "best.pt"
        if not best.is_file():
            return
        state = load_checkpoint(best)
        state["data_identity"] = self.task.data_identity()
        state["config"] = {**state.get("config", {}), "data": self.task.data_identity().get("data")}
        save_checkpoint(best, state)
        self.log(f"the run's data moved to {self.task.data_identity().get('data')}")

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        tb = None
        try:
            if self.ctx.is_main:
                if self.run_dir.removed_temp:
                    self.log(f"removed {len(self.run_dir.removed_temp)} temporary file(s) of interrupted writes")
                if self.run_dir.restarted:
                    self.log(f"{self.out}: its run finished no epoch (no last.pt); starting it again")
                if self.start_epoch == 0:
                    self.write_config()
                make_folder(self.out / "tb")
                tb = TensorBoard(self.out / "tb")
            self.log(self.task.describe(self.params) + f"; {self.ctx.world_size} process(es) on {self.ctx.device}, "
                     f"{self.epochs} epochs, lr {self.lr:g}")
            started = time.time()
            if self.unevaluated is not None:  # the run stopped during the evaluation of its last epoch
                self.end_epoch(self.start_epoch - 1, self.evaluated(self.unevaluated), tb)
            for epoch in tqdm(range(self.start_epoch, self.epochs), desc="epochs", disable=self.quiet or None,
                              initial=self.start_epoch, total=self.epochs):
                row = self.train_epoch(epoch)
                self.save_trained(epoch, row)  # nothing evaluation does can lose the trained epoch
                self.end_epoch(epoch, self.evaluated(row), tb)
            wall_time = time.time() - started
            summary = {**self.summary(wall_time), **self.task.finish(self.net, self.runtime)}
            if self.ctx.is_main:
                write_json(self.out / "summary.json", summary)
            return summary
        finally:
            if tb is not None:
                tb.close()
            self.run_dir.close()

    def batches(self, epoch: int) -> Iterable:
        """Reseed from ``(seed, epoch, rank)``, reshuffle, and iterate this epoch's batches with a bar."""
        seed_everything(epoch_seed(self.cfg.seed, epoch, self.ctx.rank))
        self.train_sampler.set_epoch(epoch)
        self.net.train()
        batches = itertools.islice(self.train_loader, self.steps_per_epoch)
        return tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                    disable=self.quiet or None)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        t0 = time.time()
        sums: dict[str, float] = {}
        weight = 0.0
        bar = self.batches(epoch)
        for step, batch in enumerate(bar):
            result = self.task.train_step(self.net, batch, self.runtime)
            if not all_finite(self.ctx, result.loss):
                self.stop_non_finite(result, epoch, step)
            optimizer_step(result.loss, self.optimizer, self.scheduler, self.runtime.precision.scaler)
            for key, value in result.stats.items():
                sums[key] = sums.get(key, 0.0) + value * result.weight
            weight += result.weight
            bar.set_postfix(loss=f"{result.loss.item():.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}")
        keys = sorted(sums)
        totals = self.ctx.all_reduce_sum([sums[k] for k in keys] + [weight])
        row: dict[str, float] = {"epoch": epoch + 1}
        row.update({k: total / totals[-1] for k, total in zip(keys, totals)})
        row.update(lr=self.optimizer.param_groups[0]["lr"], epoch_time_s=time.time() - t0)
        return row

    def stop_non_finite(self, result: Step, epoch: int, step: int) -> None:
        done = int(self.history[-1]["epoch"]) if self.history else self.start_epoch
        parts = ", ".join(f"{k} {v:.4g}" for k, v in result.stats.items())
        if done:
            after = (f"Last good checkpoint: {self.out / 'last.pt'} (after epoch {done}). Lower --lr (or use --amp "
                     "none) and continue it with --resume, or start a new run with another --output.")
        else:
            after = ("No epoch finished, so there is nothing to resume: run the command again with a lower --lr (or "
                     "--amp none); it starts again in the same folder.")
        raise NonFiniteLossError(
            f"the loss became {result.loss.item()} at epoch {epoch + 1}, step {step + 1} ({parts}); training "
            f"stopped and wrote nothing more. {after}")

    def end_epoch(self, epoch: int, row: dict[str, float], tb: Optional[TensorBoard]) -> None:
        self.history.append(row)
        improved = row[self.task.best_metric] > self.best
        self.best = max(self.best, row[self.task.best_metric])
        rngs = self.ctx.gather(rng_state())  # every process's, so a resumed multi-process run restores each
        if self.ctx.is_main:
            state = self.checkpoint_state(epoch, rngs)
            save_checkpoint(self.out / "last.pt", state)
            if improved:
                save_checkpoint(self.out / "best.pt", state)
            if not self.config_written:
                self.write_config()  # a resumed run's options only once its first checkpoint holds them
            write_metrics_csv(self.out / "metrics.csv", self.history, self.task.columns)
            tb.scalars({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
            self.task.write_outputs(self.out, self.history)
        self.log(f"epoch {epoch + 1}: " + self.task.format_row(row))
        self.ctx.barrier()

    def checkpoint_state(self, epoch: int, rngs: list[Any], **extra: Any) -> dict[str, Any]:
        """What ``last.pt`` / ``best.pt`` hold after ``epoch`` (0-based) was trained."""
        scaler = self.runtime.precision.scaler
        return dict(
            kind=self.task.kind, model=self.task.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
            epoch=epoch + 1, history=self.history, best=self.best, best_metric=self.task.best_metric,
            config=self.cfg.to_dict(), rng=rngs, params=self.params, **self.task.state_dict(), **extra,
        )

    def save_trained(self, epoch: int, row: dict[str, float]) -> None:
        """``last.pt`` once ``epoch`` is trained, before it is evaluated: its row (training columns) waits in
        ``unevaluated``; a run resumed from it evaluates that epoch first (:meth:`run`)."""
        rngs = self.ctx.gather(rng_state())
        if self.ctx.is_main:
            save_checkpoint(self.out / "last.pt", self.checkpoint_state(epoch, rngs, unevaluated=row))

    def evaluated(self, row: dict[str, float]) -> dict[str, float]:
        """The epoch's row with the validation columns; ``epoch_time_s`` counts training and evaluation."""
        t0 = time.time()
        row = {**row, **self.task.evaluate(self.net, self.runtime)}
        row["epoch_time_s"] = row.get("epoch_time_s", 0.0) + time.time() - t0
        return row

    def write_config(self) -> None:
        """``config.yaml``: the run's options, a file ``--config`` takes again (without ``output`` and ``resume``,
        which say where and how this run was started, not what it trains)."""
        recipe = {k: v for k, v in self.cfg.to_dict().items() if k not in ("output", "resume")}
        text = yaml.safe_dump(recipe, sort_keys=False)
        atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        self.config_written = True

    def summary(self, wall_time: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return dict(
            kind=self.task.kind, **self.task.summary(last), params=self.params, epochs=self.epochs,
            world_size=self.ctx.world_size, device=str(self.ctx.device), **{f"best_{self.task.best_metric}": self.best},
            wall_time_s=wall_time, torch=torch.__version__, output=str(self.out),
        )


def check_resume(state: dict[str, Any], cfg: RunConfig, task_cls: type[Task]) -> None:
    """A resumed run is of the same kind and shares the options that shape its model and data."""
    if run_kind(state) != task_cls.kind:
        raise CheckpointError(f"--resume: {cfg.output_dir} holds a {run_kind(state)} run, not a {task_cls.kind} "
                              "run; choose another --output")
    saved = state.get("config", {})
    for key in task_cls.resume_keys:
        if key == "data" and moved_data(state, getattr(cfg, key)):
            continue  # compared by identity once the task has listed it (check_same_data)
        if key in saved and not task_cls.same_setting(key, saved[key], getattr(cfg, key)):
            scalar = isinstance(saved[key], (int, float, str)) and not isinstance(saved[key], bool)
            value = resume_data(state, cfg.output_dir) if key == "data" else saved[key]
            given = f" ({flag(key)} {value})" if scalar else ""
            raise ConfigError(f"--resume: the run in {cfg.output_dir} has {key}={saved[key]!r}, this command "
                              f"{getattr(cfg, key)!r}; resume with the run's settings{given}")


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


def run_task(cfg: RunConfig, task_cls: Callable[[Any, DistContext], Task]) -> dict[str, Any]:
    """Train ``task_cls`` as configured; under torchrun every process calls this."""
    ctx = setup_distributed(cfg.device)
    try:
        return Engine(cfg, ctx, task_cls).run()
    finally:
        cleanup_distributed()
