"""Training and COCO evaluation of Mask R-CNN with LESA backbones (``lesa det train / eval / predict``).

Schedules as the paper (Sec. 4.2): ``1x`` = 12 epochs with the learning rate divided by 10 after epochs
8 and 11, ``20e`` = 20 epochs with steps after 16 and 19; SGD (momentum 0.9, weight decay 1e-4), lr 0.02
per 16 images scaled linearly, 500 linear warm-up iterations from 0.1% (at most a quarter of a short
run). ``epochs`` overrides the schedule's length and keeps its steps at the same fractions. The run
directory is laid out as for classification (``config.yaml``, ``metrics.csv``, ``tb/``, ``last.pt``,
``best.pt``, ``summary.json``) plus ``coco_eval.json`` (box and mask AP, AP50, AP75, APs/APm/APl in
percent) after every evaluation.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ..data.coco import CocoDetection, coco_evaluate, collate_detection, to_coco_results
from ..data.digit_scenes import ensure_digit_scenes
from ..engine.checkpoint import load_checkpoint, open_run_dir, rng_state, save_checkpoint, set_rng_state
from ..engine.config import config_from_values, load_yaml
from ..engine.distributed import DistContext, cleanup_distributed, setup_distributed
from ..engine.records import TensorBoard, write_json, write_metrics_csv
from ..engine.trainer import (
    EpochRunner,
    NonFiniteLossError,
    ShardSampler,
    all_finite,
    check_resume_config,
    choose_precision,
    optimizer_step,
    seed_everything,
)
from ..utils import count_params
from .maskrcnn import build_maskrcnn, describe_init

SCHEDULES = {"1x": (12, (8, 11)), "20e": (20, (16, 19))}
LOSSES = ["loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"]
COLUMNS = ["epoch", "loss", *LOSSES, "bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50", "lr", "epoch_time_s"]
EMBEDDED = "digit-scenes"
# Options left unset take these by data: CPU-sized for the embedded digit scenes; torchvision's and
# mmdetection's usual COCO settings (800-1333 px, 2 images per GPU, 512 RoIs, 2000 proposals) otherwise.
DATA_DEFAULTS = {
    "embedded": {"batch_size": 4, "min_size": 320, "max_size": 512,
                 "box_batch_size_per_image": 128, "rpn_post_nms_top_n_train": 1000},
    "coco": {"batch_size": 2, "min_size": 800, "max_size": 1333,
             "box_batch_size_per_image": 512, "rpn_post_nms_top_n_train": 2000},
}


@dataclass
class DetConfig:
    """A detection run; the defaults train the CPU-sized LESA backbone on the embedded digit scenes."""

    backbone: str = "lesa_resnet_tiny"
    data: str = EMBEDDED
    schedule: str = "1x"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None  # images per process; see DATA_DEFAULTS
    lr: float = 0.02
    lr_base_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    dcn_stages: list[int] = field(default_factory=list)
    deform_unary: bool = False
    pretrained_backbone: Optional[str] = None
    pos_init: str = "reinit"
    trainable_layers: Optional[int] = None  # default: 3 with a pretrained backbone, else all (5)
    frozen_bn: Optional[bool] = None  # default: frozen with a pretrained backbone; from scratch BN must train
    checkpoint_layers: bool = False
    box_batch_size_per_image: Optional[int] = None  # RoIs per image for the box/mask heads
    rpn_post_nms_top_n_train: Optional[int] = None  # proposals kept in training
    impl: str = "auto"
    workers: int = 0
    seed: int = 0
    output: Optional[str] = None
    resume: bool = False
    amp: str = "auto"
    device: str = "auto"
    quiet: bool = False
    max_steps_per_epoch: Optional[int] = None
    max_eval_images: Optional[int] = None

    def __post_init__(self) -> None:
        for name, value in DATA_DEFAULTS["embedded" if self.data == EMBEDDED else "coco"].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (got {self.epochs})")

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / f"det-{self.backbone}-{Path(self.data).name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def schedule_epochs(self) -> tuple[int, list[float]]:
        """Total epochs and the lr steps as fractions of training."""
        epochs, steps = SCHEDULES[self.schedule]
        return self.epochs or epochs, [s / epochs for s in steps]


def build_det_config(config_file: Optional[str] = None, **overrides: Any) -> DetConfig:
    """Defaults < YAML file < explicit overrides (``None`` values are ignored)."""
    values = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_values(DetConfig, values)


def coco_splits(data: str) -> dict[str, tuple[Path, Path]]:
    """``{'train': (annotations, images), 'val': ...}`` for the embedded digit scenes, COCO 2017's layout
    (``annotations/instances_train2017.json``, ``train2017/``) or ``train.json`` + ``train/``."""
    root = ensure_digit_scenes() if data == EMBEDDED else Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"detection data {str(root)!r} does not exist (a COCO root, or {EMBEDDED})")
    splits = {}
    for split in ("train", "val"):
        for ann, images in ((root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
                            (root / f"{split}.json", root / split)):
            if ann.is_file():
                splits[split] = (ann, images)
                break
        else:
            raise FileNotFoundError(
                f"{root}: no {split} annotations (expected annotations/instances_{split}2017.json with "
                f"{split}2017/, or {split}.json with {split}/)")
    return splits


class DetTrainer(EpochRunner):
    def __init__(self, cfg: DetConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = cfg.output_dir
        self.quiet = cfg.quiet or not ctx.is_main
        resume_state = open_run_dir(self.out, cfg.resume)
        seed_everything(cfg.seed)
        splits = coco_splits(cfg.data)
        self.train_set = CocoDetection(*splits["train"], train=True)
        self.val_set = CocoDetection(*splits["val"], train=False)
        self.model = build_detector(cfg, num_classes=len(self.train_set.classes) + 1)
        self.model.to(ctx.device)
        self.params = count_params(self.model)
        self.precision = choose_precision(cfg.amp, ctx.device)
        self.train_sampler = DistributedSampler(self.train_set, ctx.world_size, ctx.rank, shuffle=True,
                                                seed=cfg.seed, drop_last=True)
        self.train_loader = DataLoader(self.train_set, cfg.batch_size, sampler=self.train_sampler,
                                       num_workers=cfg.workers, collate_fn=collate_detection, drop_last=True)
        if len(self.train_loader) == 0:
            raise ValueError(f"{len(self.train_set)} training images are fewer than one batch per process")
        self.steps_per_epoch = min(len(self.train_loader), cfg.max_steps_per_epoch or len(self.train_loader))
        self.epochs, fractions = cfg.schedule_epochs()
        total = self.epochs * self.steps_per_epoch
        self.milestones = [int(round(f * total)) for f in fractions]
        # 500 warm-up iterations suit COCO's ~90k; a short run warms up over at most a quarter of itself.
        self.warmup_steps = min(cfg.warmup_iters, max(1, total // 4))
        self.lr = cfg.lr * cfg.batch_size * ctx.world_size / cfg.lr_base_batch
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.net: nn.Module = self.model
        if ctx.distributed:
            self.net = DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)
        self.start_epoch, self.history, self.best_ap = 0, [], -1.0
        if resume_state is not None:
            self.restore(resume_state)

    def lr_factor(self, step: int) -> float:
        factor = 0.1 ** bisect.bisect_right(self.milestones, step)
        if step < self.warmup_steps:
            ratio = self.cfg.warmup_ratio
            factor *= ratio + (1 - ratio) * step / self.warmup_steps
        return factor

    def restore(self, state: dict[str, Any]) -> None:
        check_resume_config(state, self.cfg, ("backbone", "data", "batch_size", "dcn_stages", "deform_unary"))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.history, self.best_ap = state["epoch"], list(state["history"]), state["best_ap"]
        if self.ctx.rank < len(state.get("rng") or []):
            set_rng_state(state["rng"][self.ctx.rank])
        self.log(f"resuming {self.out} after epoch {self.start_epoch}")

    def describe(self) -> str:
        return (f"Mask R-CNN + {self.cfg.backbone}-FPN: {self.params / 1e6:.2f}M parameters, "
                f"{len(self.train_set)} training images, {self.epochs} epochs, lr {self.lr:g}; "
                f"{describe_init(self.model.backbone_init)}")

    def summary(self, wall_time: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return dict(backbone=self.cfg.backbone, params=self.params, data=self.cfg.data, epochs=self.epochs,
                    world_size=self.ctx.world_size, device=str(self.ctx.device), bbox_AP=last.get("bbox_AP"),
                    segm_AP=last.get("segm_AP"), best_bbox_AP=self.best_ap, wall_time_s=wall_time,
                    output=str(self.out))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of training, then COCO evaluation; the row has the mean losses and the APs."""
        ctx = self.ctx
        t0 = time.time()
        sums = [0.0] * (len(LOSSES) + 1)
        bar = self.epoch_batches(epoch)
        for step, (images, targets) in enumerate(bar):
            images = [im.to(ctx.device) for im in images]
            targets = [{k: v.to(ctx.device) for k, v in t.items()} for t in targets]
            with self.precision.autocast(ctx.device):
                losses = self.net(images, targets)
            loss = sum(losses.values())
            if not all_finite(ctx, loss):
                raise NonFiniteLossError(
                    f"the detection loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"({ {k: round(float(v), 4) for k, v in losses.items()} }); stopped without writing. Last good "
                    f"checkpoint: {self.out / 'last.pt'}. Lower --lr and resume with --resume.")
            optimizer_step(loss, self.optimizer, self.scheduler, self.precision.scaler)
            sums[0] += loss.item()
            for i, name in enumerate(LOSSES, 1):
                sums[i] += float(losses[name].detach()) if name in losses else 0.0
            bar.set_postfix(loss=f"{loss.item():.3f}")
        totals = ctx.all_reduce_sum(sums + [float(self.steps_per_epoch)])
        steps = totals[-1]
        row = dict(epoch=epoch + 1, loss=totals[0] / steps, lr=self.optimizer.param_groups[0]["lr"],
                   epoch_time_s=time.time() - t0)
        row.update({name: totals[i] / steps for i, name in enumerate(LOSSES, 1)})
        self.evaluation = evaluate_detector(self.model, self.val_set, ctx, self.cfg.max_eval_images, self.quiet)
        row.update({f"{t}_{k}": self.evaluation[t][k] for t in ("bbox", "segm") for k in ("AP", "AP50")})
        return row

    def after_epoch(self, epoch: int, row: dict[str, float], tb: Optional[TensorBoard]) -> None:
        self.history.append(row)
        improved = row["bbox_AP"] > self.best_ap
        self.best_ap = max(self.best_ap, row["bbox_AP"])
        rngs = self.ctx.gather(rng_state())
        if self.ctx.is_main:
            state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(),
                         scaler=self.precision.scaler.state_dict() if self.precision.scaler else None,
                         epoch=epoch + 1, history=self.history, best_ap=self.best_ap, config=asdict(self.cfg),
                         classes=self.train_set.classes, category_ids=self.train_set.category_ids, rng=rngs)
            save_checkpoint(self.out / "last.pt", state)
            if improved:
                save_checkpoint(self.out / "best.pt", state)
            write_metrics_csv(self.out / "metrics.csv", self.history, COLUMNS)
            write_json(self.out / "coco_eval.json", self.evaluation)
            tb.scalars({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
        self.log(f"epoch {epoch + 1}: loss {row['loss']:.3f} (mask {row['loss_mask']:.3f}), box AP "
                 f"{row['bbox_AP']:.1f}, mask AP {row['segm_AP']:.1f} ({row['epoch_time_s']:.0f}s)")
        self.ctx.barrier()


def build_detector(cfg: DetConfig, num_classes: int) -> nn.Module:
    pretrained = bool(cfg.pretrained_backbone)
    return build_maskrcnn(
        cfg.backbone, num_classes, pretrained_backbone=cfg.pretrained_backbone, dcn_stages=cfg.dcn_stages,
        deform_unary=cfg.deform_unary,
        trainable_layers=cfg.trainable_layers if cfg.trainable_layers is not None else (3 if pretrained else 5),
        frozen_bn=cfg.frozen_bn if cfg.frozen_bn is not None else pretrained,
        min_size=cfg.min_size, max_size=cfg.max_size, pos_init=cfg.pos_init, checkpoint=cfg.checkpoint_layers,
        impl=cfg.impl, box_batch_size_per_image=cfg.box_batch_size_per_image,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
    )


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: CocoDetection, ctx: DistContext,
                      max_images: Optional[int] = None, quiet: bool = True, batch_size: int = 2) -> dict[str, dict]:
    """COCO box and mask AP over ``dataset`` (all processes share the images; rank 0 scores)."""
    model.eval()
    count = min(len(dataset), max_images or len(dataset))
    sampler = ShardSampler(count, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate_detection)
    results: dict[str, list] = {"bbox": [], "segm": []}
    for images, targets in tqdm(loader, desc="COCO eval", leave=False, disable=quiet or None):
        outputs = model([im.to(ctx.device) for im in images])
        for target, output in zip(targets, outputs):
            bbox, segm = to_coco_results(dataset, int(target["image_id"]), output)
            results["bbox"] += bbox
            results["segm"] += segm
    if ctx.distributed:
        gathered = ctx.gather(results)
        results = {k: [r for part in gathered for r in part[k]] for k in results}
    return coco_evaluate(dataset, results, quiet=True, image_ids=dataset.ids[:count])


def train_detector(cfg: DetConfig) -> dict[str, Any]:
    ctx = setup_distributed(cfg.device)
    try:
        return DetTrainer(cfg, ctx).run()
    finally:
        cleanup_distributed()


def load_detector(checkpoint: str | Path) -> tuple[nn.Module, DetConfig, dict[str, Any]]:
    """A trained detector from a run directory (``best.pt``) or checkpoint, with its config."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    state = load_checkpoint(path)
    cfg = DetConfig(**{**state["config"], "pretrained_backbone": None, "resume": False})
    model = build_detector(cfg, num_classes=len(state["classes"]) + 1)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state
