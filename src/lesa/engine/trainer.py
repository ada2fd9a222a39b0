"""Classification training and evaluation: one process or many (torchrun / DDP), CPU or CUDA.

A run directory holds ``config.yaml``, ``metrics.csv``, TensorBoard events (``tb/``), ``last.pt`` (every
epoch) and ``best.pt`` (both written atomically), ``curves.png`` and ``summary.json``. ``resume`` continues
from ``last.pt`` with the model, optimizer, schedule, scaler, epoch, history and RNG states; every epoch
reseeds all generators from ``(seed, epoch, rank)`` and shuffles with a sampler seeded the same way, so a
resumed run retraces the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from ..data import build_classification_data
from ..layers import ablate_unary as ablate_unary_layers
from ..models import create_model
from ..utils import count_params
from ..weights import check_state_dict, model_state_dict, read_checkpoint
from .checkpoint import open_run_dir, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import DistContext, cleanup_distributed, setup_distributed
from .records import TensorBoard, plot_curves, write_json, write_metrics_csv


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``: each sample evaluated exactly once across processes."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self):
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
            raise ValueError("amp=fp16 needs a CUDA device; use --amp bf16 or --amp none on CPU")
        return Precision(torch.float16, torch.amp.GradScaler("cuda"))
    return Precision(torch.bfloat16, None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine to 0, per step (the authors' schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets.unsqueeze(1)
    return [float(hits[:, : min(k, top.shape[1])].any(dim=1).sum()) for k in ks]


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


def check_resume_config(state: dict[str, Any], cfg: Any, keys: tuple[str, ...]) -> None:
    saved = state.get("config", {})
    for key in keys:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ValueError(f"--resume: the run in {cfg.output_dir} has {key}={saved[key]!r}, this command "
                             f"{getattr(cfg, key)!r}; resume with the run's settings")


def unpack(batch, may_skip: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    if may_skip:
        return batch
    images, targets = batch
    return images, targets, 0


def unwrap(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)  # torch.compile


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    precision: Optional[Precision] = None,
    may_skip: bool = False,
    quiet: bool = True,
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the loader, summed over all processes."""
    precision = precision or Precision(None, None)
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, n, skipped
    for batch in tqdm(loader, desc="eval", leave=False, disable=quiet or None):
        images, targets, bad = unpack(batch, may_skip)
        sums[4] += bad
        if len(targets) == 0:
            continue
        images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast(ctx.device):
            logits = model(images)
        sums[0] += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        top1, top5 = topk_correct(logits, targets)
        sums[1] += top1
        sums[2] += top5
        sums[3] += len(targets)
    loss, top1, top5, n, bad = ctx.all_reduce_sum(sums)
    if n == 0:
        raise ValueError("evaluation saw no decodable images")
    return dict(loss=loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, n=int(n), skipped=int(bad))


class EpochRunner:
    """The epoch loop that classification and detection share: the run directory, TensorBoard, per-epoch
    reseeding and progress bars. Subclasses set ``cfg, ctx, out, quiet, epochs, start_epoch, net,
    train_loader, train_sampler, steps_per_epoch`` and implement ``describe``, ``train_epoch``,
    ``after_epoch`` and ``summary``."""

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def run(self) -> dict[str, Any]:
        tb = None
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            tb = TensorBoard(self.out / "tb")
        self.log(self.describe())
        started = time.time()
        try:
            for epoch in tqdm(range(self.start_epoch, self.epochs), desc="epochs", disable=self.quiet or None,
                              initial=self.start_epoch, total=self.epochs):
                self.after_epoch(epoch, self.train_epoch(epoch), tb)
        finally:
            if tb is not None:
                tb.close()
        summary = self.summary(time.time() - started)
        if self.ctx.is_main:
            write_json(self.out / "summary.json", summary)
        return summary

    def epoch_batches(self, epoch: int):
        """Reseed from ``(seed, epoch, rank)``, reshuffle, and iterate this epoch's batches with a bar."""
        seed_everything(epoch_seed(self.cfg.seed, epoch, self.ctx.rank))
        self.train_sampler.set_epoch(epoch)
        self.net.train()
        batches = itertools.islice(self.train_loader, self.steps_per_epoch)
        return tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                    disable=self.quiet or None)


class Trainer(EpochRunner):
    """One training run (see the module docstring). ``run()`` returns the summary."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = cfg.output_dir
        self.quiet = cfg.quiet or not ctx.is_main
        self.resume_state = self._resume_state()
        seed_everything(cfg.seed)  # identical initial weights on every process
        self.data = build_classification_data(cfg.data, self._img_size())
        self.model = create_model(cfg.model, num_classes=len(self.data.classes), img_size=self._img_size(),
                                  **cfg.model_kwargs)
        self.params = count_params(self.model)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else ctx.device.type == "cuda"
        self.model.to(ctx.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.precision = choose_precision(cfg.amp, ctx.device)
        self.train_sampler = DistributedSampler(self.data.train, ctx.world_size, ctx.rank, shuffle=True,
                                                seed=cfg.seed, drop_last=True)
        self.train_loader = self._loader(self.data.train, cfg.batch_size, self.train_sampler)
        self.val_loader = self._loader(self.data.val, cfg.val_batch_size or cfg.batch_size,
                                       ShardSampler(len(self.data.val), ctx.rank, ctx.world_size))
        if len(self.train_loader) == 0:
            raise ValueError(f"{len(self.data.train)} training images are fewer than one batch per process "
                             f"({cfg.batch_size} x {ctx.world_size}); lower --batch-size")
        self.steps_per_epoch = min(len(self.train_loader), cfg.max_steps_per_epoch or len(self.train_loader))
        self.epochs = cfg.epochs
        self.lr = cfg.lr * cfg.batch_size * ctx.world_size / cfg.lr_base_batch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.net: nn.Module = self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        if ctx.distributed:
            self.net = DistributedDataParallel(self.net, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.start_epoch, self.history, self.best_top1 = 0, [], -1.0
        self.skipped = [0.0, 0.0]  # undecodable images, images read
        if self.resume_state is not None:
            self._restore(self.resume_state)

    # -- set-up helpers ------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps)

    def _img_size(self) -> int:
        if self.cfg.img_size:
            return self.cfg.img_size
        return 32 if self.cfg.model.endswith("_tiny") else 224

    def _loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          collate_fn=self.data.collate, pin_memory=self.ctx.device.type == "cuda",
                          drop_last=False, persistent_workers=self.cfg.workers > 0)

    def _resume_state(self) -> Optional[dict[str, Any]]:
        state = open_run_dir(self.out, self.cfg.resume)
        if state is not None:
            check_resume_config(state, self.cfg, ("model", "model_kwargs", "data", "img_size", "batch_size"))
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows this command's --lr / --epochs (resuming with a lower lr is how one recovers
        # from a diverged run); with unchanged options this is the saved learning rate exactly.
        self.scheduler.base_lrs = [self.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * self.lr_factor(self.scheduler.last_epoch)
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_top1 = float(state["best_top1"])
        self.skipped = list(state.get("skipped", [0.0, 0.0]))
        rngs = state.get("rng") or []
        if self.ctx.rank < len(rngs):
            set_rng_state(rngs[self.ctx.rank])
        self.log(f"resuming {self.out} after epoch {self.start_epoch}")

    # -- the loop ------------------------------------------------------------------------------------
    def describe(self) -> str:
        return (f"{self.cfg.model}: {self.params / 1e6:.2f}M parameters, {len(self.data.train)} training images, "
                f"{self.ctx.world_size} process(es) on {self.ctx.device}, lr {self.lr:g}")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        ctx = self.ctx
        t0 = time.time()
        sums = [0.0, 0.0, 0.0]  # loss * n, top-1 hits, n
        bar = self.epoch_batches(epoch)
        for step, batch in enumerate(bar):
            images, targets, bad = unpack(batch, self.data.may_skip)
            self.count_skipped(bad, len(targets))
            if len(targets) == 0:
                raise ValueError("a whole batch of images could not be decoded; check the data folder")
            loss, logits = self.train_step(images, targets, epoch, step)
            n = len(targets)
            sums[0] += loss * n
            sums[1] += topk_correct(logits.detach(), targets.to(logits.device), (1,))[0]
            sums[2] += n
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}")
        loss_sum, hits, n = ctx.all_reduce_sum(sums)
        val = evaluate(self.net, self.val_loader, ctx, self.precision, self.data.may_skip, self.quiet,
                       self.channels_last)
        return dict(epoch=epoch + 1, train_loss=loss_sum / n, train_top1=100.0 * hits / n, val_loss=val["loss"],
                    val_top1=val["top1"], val_top5=val["top5"], lr=self.optimizer.param_groups[0]["lr"],
                    epoch_time_s=time.time() - t0)

    def train_step(self, images, targets, epoch: int, step: int) -> tuple[float, torch.Tensor]:
        ctx, precision = self.ctx, self.precision
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast(ctx.device):
            logits = self.net(images)
            loss = self.criterion(logits.float(), targets)
        if not all_finite(ctx, loss):
            done = self.start_epoch if not self.history else int(self.history[-1]["epoch"])
            where = f"{self.out / 'last.pt'} (after epoch {done})" if done else "none was written yet"
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped and wrote "
                f"nothing more. Last good checkpoint: {where}. Lower --lr (or use --amp none) and resume "
                "with --resume, or start again."
            )
        optimizer_step(loss, self.optimizer, self.scheduler, precision.scaler)
        return loss.item(), logits

    def count_skipped(self, bad: int, good: int) -> None:
        self.skipped[0] += bad
        self.skipped[1] += bad + good
        bad_total, seen = self.skipped
        if bad_total and seen >= 200 and bad_total > self.cfg.max_bad_fraction * seen:
            raise ValueError(
                f"{int(bad_total)} of {int(seen)} images could not be decoded (more than "
                f"max_bad_fraction={self.cfg.max_bad_fraction}); fix or remove them"
            )

    def after_epoch(self, epoch: int, row: dict[str, float], tb: Optional[TensorBoard]) -> None:
        self.history.append(row)
        improved = row["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, row["val_top1"])
        rngs = self.ctx.gather(rng_state())  # every process's, so a resumed multi-process run restores each
        if self.ctx.is_main:
            state = dict(
                model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.precision.scaler.state_dict() if self.precision.scaler else None,
                epoch=epoch + 1, history=self.history, best_top1=self.best_top1, skipped=self.skipped,
                config=self.cfg.to_dict(), classes=self.data.classes, rng=rngs, params=self.params,
            )
            save_checkpoint(self.out / "last.pt", state)
            if improved:
                save_checkpoint(self.out / "best.pt", state)
            write_metrics_csv(self.out / "metrics.csv", self.history)
            tb.scalars({f"{k}": v for k, v in row.items() if k != "epoch"}, epoch + 1)
            plot_curves({self.cfg.model: self.history}, self.out / "curves.png", f"{self.cfg.model} on {self.cfg.data}")
        self.log(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                 f"val top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}% ({row['epoch_time_s']:.1f}s)")
        if self.skipped[0]:
            self.log(f"skipped {int(self.skipped[0])} undecodable images so far")
        self.ctx.barrier()

    def summary(self, wall_time: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return dict(
            model=self.cfg.model, params=self.params, data=self.cfg.data, img_size=self._img_size(),
            epochs=self.cfg.epochs, world_size=self.ctx.world_size, device=str(self.ctx.device),
            val_top1=last.get("val_top1"), val_top5=last.get("val_top5"), val_loss=last.get("val_loss"),
            best_val_top1=self.best_top1, wall_time_s=wall_time, skipped_images=int(self.skipped[0]),
            torch=torch.__version__, output=str(self.out),
        )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; under torchrun every process calls this."""
    ctx = setup_distributed(cfg.device)
    try:
        return Trainer(cfg, ctx).run()
    finally:
        cleanup_distributed()


def load_trained_model(checkpoint: str | Path, model_name: Optional[str] = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory (its ``best.pt``), a training checkpoint or a weights file, with the
    run's configuration (``{}`` for a bare weights file, which then needs ``model_name``)."""
    state = read_checkpoint(checkpoint)
    cfg = dict(state.get("config", {})) if isinstance(state, dict) else {}
    name = model_name or cfg.get("model")
    if not name:
        raise ValueError(f"{checkpoint} holds weights only: pass the model name (--model NAME)")
    sd = model_state_dict(state)
    if "fc.weight" not in sd:
        raise ValueError(f"{checkpoint}: no classifier weights (fc.weight) found; is this a classification model?")
    img_size = cfg.get("img_size") or (32 if name.endswith("_tiny") else 224)
    model = create_model(name, num_classes=sd["fc.weight"].shape[0], img_size=img_size, **cfg.get("model_kwargs", {}))
    check_state_dict(model, sd)
    model.load_state_dict(sd)
    cfg.update(model=name, img_size=img_size)
    return model, cfg


def evaluate_checkpoint(checkpoint: str | Path, data: Optional[str] = None, batch_size: int = 128,
                        device: str = "auto", workers: int = 0, quiet: bool = False,
                        model_name: Optional[str] = None, ablate_unary: bool = False) -> dict[str, Any]:
    """Evaluate a run directory (its best.pt), a training checkpoint or a weights file.

    ``ablate_unary``: Table 1's ablation, each query's own attention term removed.
    """
    ctx = setup_distributed(device)
    try:
        model, cfg = load_trained_model(checkpoint, model_name)
        data = data or cfg.get("data")
        if not data:
            raise ValueError("no data to evaluate on: pass --data PATH or --data digits")
        dataset = build_classification_data(data, cfg["img_size"], train=False)
        model.to(ctx.device)
        loader = DataLoader(dataset.val, batch_size=batch_size, num_workers=workers, collate_fn=dataset.collate,
                            sampler=ShardSampler(len(dataset.val), ctx.rank, ctx.world_size))
        quiet = quiet or not ctx.is_main
        with ablate_unary_layers(model) if ablate_unary else contextlib.nullcontext():
            metrics = evaluate(model, loader, ctx, None, dataset.may_skip, quiet)
        return dict(model=cfg["model"], data=data, checkpoint=str(checkpoint), ablate_unary=ablate_unary, **metrics)
    finally:
        cleanup_distributed()
