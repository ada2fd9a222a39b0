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

import itertools
import math
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ..errors import ConfigError, NonFiniteLossError
from ..ownership import make_folder
from ..utils import atomic_write, count_params
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig
from .distributed import DistContext, cleanup_distributed, setup_distributed
from .records import TensorBoard, write_json, write_metrics_csv
from .resume import check_resume, check_same_classes, check_same_data
from .run_dir import RunDir
from .task import Runtime, Step, Task, choose_precision


# -- the loop's own steps --------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63

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


def run_task(cfg: RunConfig, task_cls: Callable[[Any, DistContext], Task]) -> dict[str, Any]:
    """Train ``task_cls`` as configured; under torchrun every process calls this."""
    ctx = setup_distributed(cfg.device)
    try:
        return Engine(cfg, ctx, task_cls).run()
    finally:
        cleanup_distributed()
