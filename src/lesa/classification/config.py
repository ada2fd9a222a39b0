"""The options of a classification run (``lesa train``): :class:`TrainConfig`, its presets, and
:func:`build_config`, which merges a preset, a YAML file and the command line (:func:`lesa.engine.merge_values`)
and completes a fine-tuning run (``init``) from the checkpoint's run.
"""
from __future__ import annotations

import contextlib
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field

from ..data import EMBEDDED, check_source
from ..engine.config import RunConfig, flag, merge_values
from ..errors import CheckpointError, ConfigError, NotFoundError
from ..models.registry import check_model_options
from ..options import (
    ROLE_INPUT,
    ROLE_INPUT_TREE,
    Checkpoint,
    Fraction,
    ImageSize,
    Name,
    NonNegativeFloat,
    PositiveInt,
    build,
    schema,
)
from .predict import read_classifier

PRESETS = ("digits", "cluttered_digits", "fashion_mnist", "fashion_mnist_quick", "imagenet")
# model options that the run sets itself: in model_kwargs they would contradict it
RUN_SET_MODEL_OPTIONS = {"num_classes": "the data's class count", "img_size": "the option img_size (--img-size)"}


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


def build_config(config_file: Optional[str] = None, preset: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """The classification configuration (see :func:`lesa.engine.merge_config`); with ``init``, completed from
    the checkpoint's run (:func:`with_init_run`).

    Raises:
        ConfigError, NotFoundError, CheckpointError: see :func:`lesa.engine.merge_config` and
            :func:`with_init_run`.
    """
    values, sources = merge_values(TrainConfig, config_file, preset, PRESETS, **overrides)
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
