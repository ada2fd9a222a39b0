"""The options of a classification run (``lesa train``): :class:`TrainConfig`, its presets, and
:func:`build_config`, which merges a preset, a YAML file and the command line (:func:`lesa.engine.merge_values`)
and completes a fine-tuning run (``init``) from the checkpoint's run.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field

from ..data import EMBEDDED, DataRoot, Download, check_source
from ..engine.config import RunConfig, merge_values, resumed_default_output, run_directory
from ..errors import CheckpointError, ConfigError, NotFoundError
from ..layers.binary import IMPLS, POS_EMBEDS
from ..models.registry import check_model_options
from ..options import (
    NO_FLAG,
    ROLE_INPUT_FILE,
    ROLE_INPUT_TREE,
    Checkpoint,
    Fraction,
    ImageSize,
    Name,
    NonNegativeFloat,
    PositiveInt,
    build,
    flag,
    metavar,
    option_names,
    schema,
)
from .predict import read_classifier

PRESETS = ("digits", "cluttered_digits", "fashion_mnist", "fashion_mnist_quick", "imagenet")
# model options that the run sets itself: in model_kwargs they would contradict it
RUN_SET_MODEL_OPTIONS = {"num_classes": "the data's class count", "img_size": "the option img_size (--img-size)"}


@schema
class LayerOptions:
    """The options of a model's attention layers that a run may give at the top level, in a file as on the command
    line (:func:`lesa.engine.merge_config` moves them into ``model_kwargs``, where the model checks them)."""

    pos_embed: Optional[Literal[POS_EMBEDS]] = Field(
        None, description="position embedding of the attention layers (default: the model's, flat)")
    impl: Optional[Literal[IMPLS]] = Field(None, description="binary-term implementation (default: the model's, auto)")
    heads: Optional[PositiveInt] = Field(
        None, description="attention heads of the attention layers (default: the model's, 8)")


@schema
class TrainConfig(RunConfig):
    """A classification run; the defaults are the embedded digits recipe (``configs/digits.yaml``)."""

    LAYER_OPTIONS: ClassVar[tuple[str, ...]] = tuple(option_names(LayerOptions))
    TASK_OUTPUTS: ClassVar[tuple[str, ...]] = ("curves.png",)

    model: Name = Field("lesa_resnet_tiny", description="model name (lesa models)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=NO_FLAG)  # pos_embed, impl, heads, ...
    data: Optional[Name] = Field(default="digits", json_schema_extra=ROLE_INPUT_TREE, description=(
        "'digits', 'cluttered-digits' (embedded), 'fashion-mnist' (apt-get install dataset-fashion-mnist) or an "
        "ImageFolder root with train/ and val/"))
    data_root: DataRoot = None
    download: Download = False
    img_size: Optional[ImageSize] = Field(None, description="input size (default: the model's, 224 or 32)")
    epochs: PositiveInt = Field(15, description="passes over the training data")
    batch_size: PositiveInt = Field(64, description="images per process")
    val_batch_size: Optional[PositiveInt] = Field(
        None, description="images per validation batch (default: --batch-size)")
    nesterov: bool = Field(True, json_schema_extra=NO_FLAG)
    weight_decay: NonNegativeFloat = Field(5e-4, description="L2 penalty of the SGD step (weight decay)")
    warmup_epochs: NonNegativeFloat = Field(
        2.0, description="epochs of linear learning-rate warm-up before the cosine decay")
    label_smoothing: Fraction = Field(0.0, description="share of the target spread over all classes")
    # a subset fixed for the data, not the seed: every seed and operation of a comparison sees the same images
    # (compare --quick on fashion-mnist)
    train_subset: Optional[PositiveInt] = Field(None, json_schema_extra=metavar("N"), description=(
        "train on at most N training images, a random subset fixed for the data (the same for every seed)"))
    preset: Optional[Literal[PRESETS]] = Field(None, description="start from a shipped recipe")
    # its weights, not its optimizer or epoch; build_config takes the model from its run
    init: Optional[Checkpoint] = Field(None, json_schema_extra={**ROLE_INPUT_FILE, **metavar("CKPT")}, description=(
        "fine-tune from a classifier: run directory (best.pt), training checkpoint or weights file "
        "(.pt/.pth/.safetensors); model from its run, a new classifier for another class count, position tables "
        "resized for another --img-size; a new run from epoch 0 (not --resume)"))
    output: Optional[Name] = run_directory("<model>-<data>")

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
    cfg = build(TrainConfig, values, sources)
    named = resumed_default_output(cfg, config_file, PRESETS, overrides)
    return cfg if named is None else build_config(config_file, preset, **named)


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
