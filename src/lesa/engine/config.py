"""Training configuration: defaults < preset < YAML file < command line."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

PRESETS = ("digits", "imagenet")


@dataclass
class TrainConfig:
    """Everything a training run depends on; the defaults are the embedded digits recipe
    (``configs/digits.yaml``). ``batch_size`` is per process; the learning rate is
    ``lr * global_batch / lr_base_batch`` (linear scaling)."""

    model: str = "lesa_resnet_tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # pos_embed, impl, heads, ...
    data: Optional[str] = "digits"
    img_size: Optional[int] = None  # default: the model's
    epochs: int = 15
    batch_size: int = 64
    val_batch_size: Optional[int] = None
    lr: float = 0.05
    lr_base_batch: int = 64
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    workers: int = 0
    seed: int = 0
    output: Optional[str] = None  # default: runs/<model>-<data name>
    resume: bool = False
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU), none, bf16, fp16
    channels_last: Optional[bool] = None  # default: on CUDA
    compile: bool = False
    device: str = "auto"
    quiet: bool = False
    max_bad_fraction: float = 0.001
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (smoke tests)
    preset: Optional[str] = None

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            problems.append(f"amp must be auto, none, bf16 or fp16 (got {self.amp!r})")
        if not 0 <= self.max_bad_fraction < 1:
            problems.append(f"max_bad_fraction must be in [0, 1) (got {self.max_bad_fraction})")
        if not self.data:
            problems.append("no data: pass --data PATH (ImageFolder root with train/ and val/) or --data digits")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    @property
    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        data_name = Path(self.data).name or "data"
        return Path("runs") / f"{self.model}-{data_name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("lesa").joinpath("configs", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    return values


def build_config(config_file: Optional[str] = None, preset: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """Merge defaults, a preset, a YAML file and explicit overrides (``None`` values are ignored)."""
    values: dict[str, Any] = {}
    file_values = load_yaml(config_file) if config_file else {}
    preset = preset or file_values.get("preset")
    if preset:
        values.update(preset_values(preset))
        values["preset"] = preset
    values.update(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_values(TrainConfig, values)


def config_from_values(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` for a config dataclass, naming unknown options instead of a TypeError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config options {unknown}; valid options: {sorted(known)}")
    return cls(**values)
