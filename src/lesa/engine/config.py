"""Run configuration: defaults < preset < YAML file < command line, validated by one schema
(:mod:`lesa.options`) before any data or model is built.

:class:`RunConfig` holds what every training task shares (schedule length, batch, optimizer, precision,
devices, the run directory); each task's config adds its own options (``lesa.classification.TrainConfig``,
``lesa.detection.config.DetConfig``) and names its presets. A field's annotation is its type and range; what
depends on several options is checked in ``problems()``. :func:`merge_config` merges a preset, a YAML file
(with ``extends``) and the command line for any of them.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, TypeVar

import yaml
from pydantic import Field

from ..errors import ConfigError, LesaError, NotFoundError
from ..options import (
    NEGATABLE,
    NO_FLAG,
    ROLE_OUTPUT_DIR,
    Device,
    Fraction,
    Name,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Workers,
    build,
    flag,
    load_yaml,
    option_names,
    schema,
)

AMP_MODES = ("auto", "none", "bf16", "fp16")

C = TypeVar("C", bound="RunConfig")


def run_directory(default_name: str) -> Any:
    """The ``output`` option of a task's config: the run directory, ``runs/<default_name>`` where not given (a
    task redeclares it to name its own)."""
    return Field(None, description=f"run directory (default runs/{default_name})", json_schema_extra=ROLE_OUTPUT_DIR)

RUN_OUTPUTS = ("config.yaml", "last.pt", "best.pt", "metrics.csv", "summary.json")  # every task's run writes them


@schema
class RunConfig:
    """Options every training task shares. ``batch_size`` is per process; the learning rate is
    ``lr * global_batch / lr_base_batch`` (linear scaling)."""

    TASK_OUTPUTS: ClassVar[tuple[str, ...]] = ()  # the files a task's run writes besides RUN_OUTPUTS

    epochs: Optional[PositiveInt] = None
    batch_size: Optional[PositiveInt] = None
    lr: PositiveFloat = Field(0.05, description="learning rate for a global batch of --lr-base-batch")
    lr_base_batch: PositiveInt = Field(64, description="the global batch --lr is given for (linear scaling)")
    momentum: NonNegativeFloat = Field(0.9, json_schema_extra=NO_FLAG)
    nesterov: bool = Field(False, json_schema_extra=NO_FLAG)
    weight_decay: NonNegativeFloat = Field(1e-4, description="L2 penalty of the SGD step (weight decay)")
    workers: Workers = Field(0, description="data-loading processes per training process")
    # numpy's and torch's seeds both take it
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = Field(
        0, description="random seed (initialisation, data order, augmentation)")
    output: Optional[Name] = run_directory("run")
    resume: bool = Field(False, description="continue from OUTPUT/last.pt")
    amp: Literal[AMP_MODES] = Field(
        "auto", description="mixed precision: auto (bf16 / fp16 on CUDA, off on CPU), none, "
                                                        "bf16 or fp16")
    channels_last: Optional[bool] = Field(None, description="channels-last memory format (default: on CUDA)",
                                          json_schema_extra=NEGATABLE)
    compile: bool = Field(False, description="torch.compile the model")
    device: Device = Field("auto", description="auto, cpu or cuda")
    quiet: bool = Field(False, description="no progress bars or epoch lines")
    max_steps_per_epoch: Optional[PositiveInt] = Field(None, description="cut epochs short (smoke tests)")
    max_bad_fraction: Fraction = Field(0.001, description="undecodable training images tolerated, as a fraction "
                                                          "of the training set")

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
        return {"output": [*RUN_OUTPUTS, *self.TASK_OUTPUTS]}

    def total_epochs(self) -> int:
        return int(self.epochs or 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_values(name: str, presets: tuple[str, ...]) -> dict[str, Any]:
    """The options of a shipped recipe (``lesa/configs/NAME.yaml``); a recipe that names another in ``extends``
    is that one's options updated by its own."""
    if name not in presets:
        raise ConfigError(preset_error(name, presets))
    text = resources.files("lesa").joinpath("configs", f"{name}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    base = values.pop("extends", None)
    return {**preset_values(base, presets), **values} if base else values


def merge_config(cls: type[C], config_file: Optional[str] = None, preset: Optional[str] = None,
                 presets: tuple[str, ...] = (), **overrides: Any) -> C:
    """Defaults < a preset < a YAML file < explicit overrides (``None`` values are ignored; mappings merge); a
    command that resumes a run (``resume`` with ``output``) has that run's ``config.yaml`` below them all.

    The layer options of ``cls.LAYER_OPTIONS`` (``heads``, ``pos_embed``, ``impl`` for classification) may
    be given at the top level, in a file as on the command line: they go into ``model_kwargs``.

    An error names each option where it was given: ``--lr`` (an override, as on the command line),
    ``lr in run.yaml`` or ``lr in preset imagenet``.

    Raises:
        ConfigError, NotFoundError: see :func:`lesa.options.build` and :func:`lesa.options.load_yaml`.
    """
    cfg = build(cls, *merge_values(cls, config_file, preset, presets, **overrides))
    named = resumed_default_output(cfg, config_file, presets, overrides)
    return cfg if named is None else build(cls, *merge_values(cls, config_file, preset, presets, **named))


def resumed_default_output(cfg: RunConfig, config_file: Optional[str], presets: tuple[str, ...],
                           overrides: dict[str, Any]) -> Optional[dict[str, Any]]:
    """For a command resuming the default run folder (``--resume`` without an output anywhere): the overrides
    naming that folder, so that its run's options are merged as for ``--output`` (the folder is known only once
    the options are built); ``None`` otherwise."""
    if not getattr(cfg, "resume", False) or overrides.get("output") is not None or _given_in_files(config_file,
                                                                                                    presets):
        return None
    return {**overrides, "output": str(cfg.output_dir)}


def merge_values(cls: type, config_file: Optional[str] = None, preset: Optional[str] = None,
                 presets: tuple[str, ...] = (), **overrides: Any) -> tuple[dict[str, Any], dict[str, str]]:
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
    run = _resumed_run(cls, files + [("", overrides)])
    layers = run + layers
    preset = preset or (run[0][1].get("preset") if run else None)  # the run's recipe stays on its record
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


def _given_in_files(config_file: Optional[str], presets: tuple[str, ...]) -> bool:
    """Whether a config file (or one it extends) names the output."""
    return bool(config_file) and any("output" in values for _, values in config_files(config_file, presets))


def _resumed_run(cls: type, given: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The options of the run a command resumes (``--resume`` with ``--output RUN``), from the ``config.yaml``
    lesa wrote there (or, without it, its ``last.pt``), as the lowest layer: what this command does not give is
    the run's, not a default."""
    from ..ownership import owns

    resume = next((v.get("resume") for _, v in reversed(given) if v.get("resume") is not None), None)
    output = next((v.get("output") for _, v in reversed(given) if v.get("output") is not None), None)
    if not resume or not isinstance(output, str):
        return []
    path, last = Path(output) / "config.yaml", Path(output) / "last.pt"
    try:
        if path.is_file() and owns(path):
            saved = load_yaml(path)
        elif last.is_file() and owns(last):  # config.yaml removed: the checkpoint holds the same options
            from ..weights import read_weights

            path, saved = last, dict(read_weights(last, run=True, mmap=True).checkpoint.get("config", {}))
        else:
            return []
    except (OSError, ValueError, LesaError):  # unreadable: the run's checkpoint is checked and named later
        return []
    # the options of this command's kind only: a run of another task is refused once its checkpoint is read
    # (``init`` says how the run began, not what it trains: a resumed run continues from its own checkpoint)
    known = (set(option_names(cls)) | set(getattr(cls, "LAYER_OPTIONS", ()))) - {"output", "resume", "init"}
    options = {k: v for k, v in saved.items() if k in known}
    if isinstance(options.get("data"), str) and options["data"].startswith("/") and not Path(options["data"]).exists():
        del options["data"]  # data that moved: the run is refused naming where its data is found now (--data)
    return [(str(path), options)]


def preset_error(name: Any, presets: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(name).lower().replace("-", "_"), presets, n=1)
    return (f"unknown preset {name!r}" + (f" (did you mean {close[0]}?)" if close else "") +
            f"; choose one of {', '.join(presets)}")


MAX_EXTENDS = 64  # files in one chain of extends


def config_files(path: str | Path, presets: tuple[str, ...] = (), _seen: tuple[Path, ...] = ()
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


