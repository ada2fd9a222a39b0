"""Run configuration: defaults < preset < YAML file < command line, validated by one schema
(:mod:`lesa.options`) before any data or model is built.

:class:`RunConfig` holds what every training task shares (schedule length, batch, optimizer, precision,
devices, the run directory); :class:`TrainConfig` adds classification's options, and the detection
config (``lesa.detection.train.DetConfig``) its own. A field's annotation is its type and range; what
depends on several options is checked in ``problems()``. A fine-tuning run (``init``) takes its model from
the checkpoint's run (:func:`build_config`).
"""
from __future__ import annotations

import contextlib
import difflib
from dataclasses import asdict, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, TypeVar

import yaml
from pydantic import Field

from ..data import EMBEDDED, check_source
from ..errors import CheckpointError, ConfigError, NotFoundError
from ..models.registry import check_model_options
from ..options import (
    ROLE_INPUT,
    ROLE_INPUT_TREE,
    ROLE_OUTPUT_DIR,
    Checkpoint,
    Device,
    Fraction,
    ImageSize,
    Name,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Workers,
    build,
    load_yaml,
    schema,
)

PRESETS = ("digits", "cluttered_digits", "fashion_mnist", "fashion_mnist_quick", "imagenet")
AMP_MODES = ("auto", "none", "bf16", "fp16")
# model options that the run sets itself: in model_kwargs they would contradict it
RUN_SET_MODEL_OPTIONS = {"num_classes": "the data's class count", "img_size": "the option img_size (--img-size)"}

C = TypeVar("C", bound="RunConfig")
RUN_OUTPUTS = ("config.yaml", "last.pt", "best.pt", "metrics.csv", "summary.json", "curves.png", "coco_eval.json")


@schema
class RunConfig:
    """Options every training task shares. ``batch_size`` is per process; the learning rate is
    ``lr * global_batch / lr_base_batch`` (linear scaling)."""

    epochs: Optional[PositiveInt] = None
    batch_size: Optional[PositiveInt] = None
    lr: PositiveFloat = 0.05
    lr_base_batch: PositiveInt = 64
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 1e-4
    workers: Workers = 0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0  # numpy's and torch's seeds both take it
    output: Optional[Name] = Field(default=None, json_schema_extra=ROLE_OUTPUT_DIR)  # default: runs/<task's name>
    resume: bool = False
    amp: Literal[AMP_MODES] = "auto"  # auto (bf16/fp16 on CUDA, off on CPU), none, bf16, fp16
    channels_last: Optional[bool] = None  # default: on CUDA
    compile: bool = False
    device: Device = "auto"
    quiet: bool = False
    max_steps_per_epoch: Optional[PositiveInt] = None  # cut epochs short (smoke tests)
    max_bad_fraction: Fraction = 0.001  # undecodable training images tolerated, a fraction of the training set

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with a combination of values (each with the fix); subclasses add their own."""
        return []

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.default_run_name()

    def default_run_name(self) -> str:
        return "run"

    def default_outputs(self) -> dict[str, str]:
        """Where the run writes when ``output`` is unset (for :func:`lesa.outputs.guard_outputs`)."""
        return {"output": str(self.output_dir)}

    def planned_outputs(self) -> dict[str, list[str]]:
        """The files a run writes in its folder (none of them may be an input, such as ``--config``)."""
        return {"output": list(RUN_OUTPUTS)}

    def total_epochs(self) -> int:
        return int(self.epochs or 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@schema
class TrainConfig(RunConfig):
    """A classification run; the defaults are the embedded digits recipe (``configs/digits.yaml``)."""

    LAYER_OPTIONS: ClassVar[tuple[str, ...]] = ("heads", "pos_embed", "impl")

    model: Name = "lesa_resnet_tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # pos_embed, impl, heads, ...
    data: Optional[Name] = Field(default="digits", json_schema_extra=ROLE_INPUT_TREE)
    # where a named set read from files (fashion-mnist) looks first, and whether it may download them
    data_root: Optional[Name] = Field(default=None, json_schema_extra=ROLE_INPUT)
    download: bool = False
    img_size: Optional[ImageSize] = None  # default: the model's
    epochs: PositiveInt = 15
    batch_size: PositiveInt = 64
    val_batch_size: Optional[PositiveInt] = None
    nesterov: bool = True
    weight_decay: NonNegativeFloat = 5e-4
    warmup_epochs: NonNegativeFloat = 2.0
    label_smoothing: Fraction = 0.0
    # train on at most this many training images, a random subset fixed for the data (not the seed): every
    # seed and operation of a comparison sees the same images (compare --quick on fashion-mnist)
    train_subset: Optional[PositiveInt] = None
    preset: Optional[Literal[PRESETS]] = None
    # fine-tune from a classification checkpoint: its weights (not its optimizer or epoch); build_config takes
    # the model from its run
    init: Optional[Checkpoint] = Field(default=None, json_schema_extra=ROLE_INPUT)

    def __post_init__(self) -> None:
        # paths are resolved once, here, and stored absolute: eval / resume from another working folder find the
        # same files (lesa.engine.run_data finds a run's data that moved)
        folder = Path(self.data).expanduser() if self.data and self.data not in EMBEDDED else None
        with contextlib.suppress(OSError):  # a name too long to look up is refused where it is read
            if folder is not None and folder.is_dir():
                self.data = str(folder.resolve())
            if self.data_root and Path(self.data_root).expanduser().is_dir():
                self.data_root = str(Path(self.data_root).expanduser().resolve())
            if self.init and Path(self.init).expanduser().exists():
                self.init = str(Path(self.init).expanduser().resolve())
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.data:
            problems.append("no data: pass --data PATH (ImageFolder root with train/ and val/) or --data digits")
        try:
            check_source(self.data or "", self.data_root, self.download)
        except ConfigError as err:
            problems.append(str(err))
        if self.init and self.resume:
            problems.append("--init and --resume exclude each other: --init starts a new run from a checkpoint's "
                            "weights, --resume continues the run in --output; drop one")
        for key, owner in RUN_SET_MODEL_OPTIONS.items():
            if key in self.model_kwargs:
                problems.append(f"model_kwargs: {key} is set by {owner}; remove it from model_kwargs")
        try:
            sized = {"img_size": self.img_size} if self.img_size else {}
            check_model_options(self.model, {**self.model_kwargs, **sized})
        except ConfigError as err:
            problems.append(str(err))
        return problems

    def default_run_name(self) -> str:
        return f"{self.model}-{Path(self.data or 'data').name or 'data'}"

    def total_epochs(self) -> int:
        return self.epochs


def preset_values(name: str, presets: tuple[str, ...] = PRESETS) -> dict[str, Any]:
    """The options of a shipped recipe (``lesa/configs/NAME.yaml``); a recipe that names another in ``extends``
    is that one's options updated by its own."""
    if name not in presets:
        raise ConfigError(preset_error(name, presets))
    text = resources.files("lesa").joinpath("configs", f"{name}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    base = values.pop("extends", None)
    return {**preset_values(base, presets), **values} if base else values


def flag(option: str) -> str:
    """The command-line spelling of an option (``batch_size`` -> ``--batch-size``)."""
    return "--" + option.replace("_", "-")


def merge_config(cls: type[C], config_file: Optional[str] = None, preset: Optional[str] = None,
                 presets: tuple[str, ...] = PRESETS, **overrides: Any) -> C:
    """Defaults < a preset < a YAML file < explicit overrides (``None`` values are ignored; mappings merge).

    The layer options of ``cls.LAYER_OPTIONS`` (``heads``, ``pos_embed``, ``impl`` for classification) may
    be given at the top level, in a file as on the command line: they go into ``model_kwargs``.

    An error names each option where it was given: ``--lr`` (an override, as on the command line),
    ``lr in run.yaml`` or ``lr in preset imagenet``.

    Raises:
        ConfigError, NotFoundError: see :func:`lesa.options.build` and :func:`lesa.options.load_yaml`.
    """
    return build(cls, *merge_values(cls, config_file, preset, presets, **overrides))


def merge_values(cls: type, config_file: Optional[str] = None, preset: Optional[str] = None,
                 presets: tuple[str, ...] = PRESETS, **overrides: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The options :func:`merge_config` builds, before validation, and where each was given.

    A file's (or preset's) ``null`` is the value ``None``, which clears a base's value where an option takes
    none (``train_subset``; the imagenet preset's ``data: null`` means "must be given"); a ``None`` override is
    an option the command line did not give.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None and not str(config_file).strip():
        raise ConfigError("--config is empty: pass a YAML file, or drop --config")
    files = config_files(config_file, presets) if config_file else []
    if not preset:  # the last file that names a preset (a null in it: none)
        where, preset = next(((name, given["preset"]) for name, given in reversed(files) if "preset" in given),
                             (None, None))
        if preset is not None and preset not in presets:
            raise ConfigError(f"preset in {where}: {preset_error(preset, presets)}")
    layers = [(f"preset {preset}", preset_values(preset, presets))] if preset else []
    for source, given in layers + files + [("", overrides)]:
        for key, value in _nest_layer_options(cls, given, source).items():
            if value is None and not source:  # an option the command line did not give
                continue
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}  # mappings merge key by key: --heads 4 keeps the file's pos_embed
            values[key] = value
            sources[key] = f"{key} in {source}" if source else flag(key)
    values.pop("preset", None)
    if preset:
        values["preset"] = preset
    return values, sources


def preset_error(name: Any, presets: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(name).lower().replace("-", "_"), presets, n=1)
    return (f"unknown preset {name!r}" + (f" (did you mean {close[0]}?)" if close else "") +
            f"; choose one of {', '.join(presets)}")


MAX_EXTENDS = 64  # files in one chain of extends


def config_files(path: str | Path, presets: tuple[str, ...] = PRESETS, _seen: tuple[Path, ...] = ()
                 ) -> list[tuple[str, dict[str, Any]]]:
    """A YAML file's name and options, and those of the files it builds on, base first: ``extends: base.yaml``
    (a path relative to the file that names it; ``~`` is the home folder) puts that file's options below its
    own, as a shipped recipe's ``extends`` does; ``extends: PRESET`` is ``preset: PRESET``.

    Raises:
        ConfigError: ``extends`` that is not a file name or a preset, a cycle, a chain over
            :data:`MAX_EXTENDS` files, a name the system cannot look up, or ``extends`` and ``preset`` naming
            two presets; and the errors of :func:`lesa.options.load_yaml`, naming the file.
        NotFoundError: a file named by ``extends`` does not exist.
    """
    name, path = str(path), Path(path)
    values = load_yaml(path)
    base = values.pop("extends", None)
    if base is None:
        return [(name, values)]
    where = f"extends in {path}"
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{where}: got {base!r}; name a YAML file (relative to {path.name}) or a preset "
                          f"({', '.join(presets)})")
    if base in presets:
        if values.get("preset") not in (None, base):
            raise ConfigError(f"{where} names preset {base!r} and preset names {values['preset']!r}; keep one")
        return [(name, {**values, "preset": base})]
    base_path = path.parent / Path(base).expanduser()
    try:
        kind = "file" if base_path.is_file() else "folder" if base_path.is_dir() else None
        chain = _seen + (path.resolve(),)
        cycle = base_path.resolve() in chain
    except (OSError, ValueError, RuntimeError) as err:  # too long, a NUL byte, a symlink loop
        raise ConfigError(f"{where}: {base!r} cannot be looked up ({err}); name a YAML file") from None
    if Path(base).suffix not in (".yaml", ".yml") and kind != "file":
        raise ConfigError(f"{where}: {preset_error(base, presets)}, or name a .yaml file (relative to {path.name})")
    if cycle:
        raise ConfigError(f"{where}: {base} leads back to {path} (a cycle of extends); remove one of them")
    if len(chain) >= MAX_EXTENDS:
        raise ConfigError(f"{where}: more than {MAX_EXTENDS} files extend one another; merge some of them")
    if kind != "file":
        raise NotFoundError(f"{where}: {str(base_path)!r} " + ("is a folder, not a YAML file" if kind else
                            f"does not exist; the path is relative to {path.name}'s folder"))
    return config_files(base_path, presets, chain) + [(name, values)]


def _nest_layer_options(cls: type, values: dict[str, Any], source: str = "") -> dict[str, Any]:
    """``values`` with the layer options of ``cls`` moved into ``model_kwargs`` (a file's nulls kept, the
    command line's dropped)."""
    layer = {k: values[k] for k in getattr(cls, "LAYER_OPTIONS", ()) if k in values}
    if not layer:
        return values
    nested = {k: v for k, v in values.items() if k not in layer}
    kept = {k: v for k, v in layer.items() if v is not None or source}
    given = nested.get("model_kwargs") if isinstance(nested.get("model_kwargs"), dict) else {}
    clash = [k for k, v in kept.items() if k in given and given[k] != v]
    if clash:
        raise ConfigError(f"{clash[0]} is given twice, as {kept[clash[0]]!r} and as {given[clash[0]]!r} in "
                          f"model_kwargs{f' in {source}' if source else ''}; keep one")
    if kept:
        base = nested.get("model_kwargs")
        nested["model_kwargs"] = {**base, **kept} if isinstance(base, dict) else kept
    return nested


def build_config(config_file: Optional[str] = None, preset: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """The classification configuration (see :func:`merge_config`); with ``init``, completed from the
    checkpoint's run (:func:`with_init_run`).

    Raises:
        ConfigError, NotFoundError, CheckpointError: see :func:`merge_config` and :func:`with_init_run`.
    """
    values, sources = merge_values(TrainConfig, config_file, preset, **overrides)
    if isinstance(values.get("init"), str) and values["init"]:  # other values: the schema names the error
        values = with_init_run(values, sources)
    return build(TrainConfig, values, sources)


def with_init_run(values: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """``values`` completed from the run of the ``init`` checkpoint: its model, its ``model_kwargs`` below the
    given ones and its ``img_size`` unless one is given (a weights file has no run: ``values`` as they are).

    Raises:
        ConfigError: a model given (named as the user wrote it) that is not the checkpoint's, with the fix.
        NotFoundError, CheckpointError: the checkpoint cannot be read or is no classifier (the message starts
            with the option).
    """
    from .classification import read_classifier  # classification imports this module

    option = sources.get("init", "init")
    try:
        _, run = read_classifier(values["init"])
    except (CheckpointError, NotFoundError) as err:
        raise type(err)(f"{option}: {err}") from None
    if not run.get("model"):
        return values
    given = values.get("model")
    if given is not None and given != run["model"]:
        raise ConfigError(f"{sources.get('model', 'model')} {given} contradicts {option} {values['init']}, a run of "
                          f"{run['model']}: pass {flag('model')} {run['model']} (or no model: the checkpoint's is "
                          f"used), or initialise from a checkpoint of {given}")
    out = {**values, "model": run["model"]}
    given_kwargs = values.get("model_kwargs", {})
    if isinstance(given_kwargs, dict):  # other values: the schema names the error
        out["model_kwargs"] = {**run.get("model_kwargs", {}), **given_kwargs}
    if values.get("img_size") is None and run.get("img_size") is not None:
        out["img_size"] = run["img_size"]
    return out
