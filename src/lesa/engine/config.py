"""Run configuration: defaults < preset < YAML file < command line, type-checked and validated before any
data or model is built.

:class:`RunConfig` holds what every training task shares (schedule length, batch, optimizer, precision,
devices, the run directory); :class:`TrainConfig` adds classification's options, and the detection
config (``lesa.detection.train.DetConfig``) its own.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import yaml

from ..errors import ConfigError, NotFoundError
from ..models.registry import check_model_options

PRESETS = ("digits", "cluttered_digits", "imagenet")
AMP_MODES = ("auto", "none", "bf16", "fp16")

C = TypeVar("C", bound="RunConfig")


@dataclass
class RunConfig:
    """Options every training task shares. ``batch_size`` is per process; the learning rate is
    ``lr * global_batch / lr_base_batch`` (linear scaling)."""

    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: float = 0.05
    lr_base_batch: int = 64
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    workers: int = 0
    seed: int = 0
    output: Optional[str] = None  # default: runs/<task-specific name>
    resume: bool = False
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU), none, bf16, fp16
    channels_last: Optional[bool] = None  # default: on CUDA
    compile: bool = False
    device: str = "auto"
    quiet: bool = False
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (smoke tests)

    def __post_init__(self) -> None:
        check_types(self)
        problems = self.problems()
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the values (each with the fix); subclasses add their own."""
        problems = []
        for name in ("epochs", "batch_size", "lr_base_batch", "max_steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (got {value})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        for name in ("momentum", "weight_decay", "workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {', '.join(AMP_MODES)} (got {self.amp!r})")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            problems.append(f"device must be auto, cpu or cuda (got {self.device!r})")
        return problems

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.default_run_name()

    def default_run_name(self) -> str:
        return "run"

    def total_epochs(self) -> int:
        return int(self.epochs or 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """A classification run; the defaults are the embedded digits recipe (``configs/digits.yaml``)."""

    model: str = "lesa_resnet_tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # pos_embed, impl, heads, ...
    data: Optional[str] = "digits"
    img_size: Optional[int] = None  # default: the model's
    epochs: int = 15
    batch_size: int = 64
    val_batch_size: Optional[int] = None
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    max_bad_fraction: float = 0.001
    preset: Optional[str] = None

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.img_size is not None and self.img_size < 1:
            problems.append(f"img_size must be > 0 (got {self.img_size})")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            problems.append(f"val_batch_size must be >= 1 (got {self.val_batch_size})")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 <= self.max_bad_fraction < 1:
            problems.append(f"max_bad_fraction must be in [0, 1) (got {self.max_bad_fraction})")
        if not self.data:
            problems.append("no data: pass --data PATH (ImageFolder root with train/ and val/) or --data digits")
        try:
            check_model_options(self.model, self.model_kwargs)
        except ConfigError as err:
            problems.append(str(err))
        return problems

    def default_run_name(self) -> str:
        return f"{self.model}-{Path(self.data or 'data').name or 'data'}"

    def total_epochs(self) -> int:
        return self.epochs


def check_types(cfg: Any) -> None:
    """Every field of a config dataclass holds a value of its annotated type (ints are accepted for
    floats and converted); otherwise a :class:`ConfigError` naming the option."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        hint = hints[f.name]
        if not _matches(value, hint):
            raise ConfigError(f"option {f.name!r} must be {_describe(hint)}, got {value!r} "
                              f"({type(value).__name__}); fix it in the config file or on the command line")
        if _base(hint) is float and isinstance(value, int):
            setattr(cfg, f.name, float(value))


def _base(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is Union and len(args) == 1 else hint


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def preset_values(name: str, presets: tuple[str, ...] = PRESETS) -> dict[str, Any]:
    """The options of a shipped recipe (``lesa/configs/NAME.yaml``)."""
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    text = resources.files("lesa").joinpath("configs", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{line}: {getattr(err, 'problem', err)}") \
            from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value")
    return values


def merge_config(cls: type[C], config_file: Optional[str] = None, preset: Optional[str] = None,
                 presets: tuple[str, ...] = PRESETS, **overrides: Any) -> C:
    """Defaults < a preset < a YAML file < explicit overrides (``None`` values are ignored; mappings merge)."""
    values: dict[str, Any] = {}
    file_values = load_yaml(config_file) if config_file else {}
    preset = preset or file_values.get("preset")
    if preset:
        values.update(preset_values(preset, presets))
        values["preset"] = preset
    values.update(file_values)
    for key, value in overrides.items():
        if value is None:
            continue
        # mappings (model_kwargs) merge key by key: --heads 4 keeps the file's pos_embed
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) \
            else value
    return config_from_values(cls, values)


def build_config(config_file: Optional[str] = None, preset: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """The classification configuration (see :func:`merge_config`)."""
    return merge_config(TrainConfig, config_file, preset, **overrides)


def config_from_values(cls: type[C], values: dict[str, Any]) -> C:
    """``cls(**values)`` for a config dataclass, naming unknown options instead of a TypeError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config options {unknown}; valid options: {sorted(known)}")
    return cls(**values)
