"""The ``lesa`` command line (also ``python -m lesa``).

Each command is two things side by side: its options schema (a :func:`lesa.options.schema` class: types,
ranges, choices, defaults, help, the roles of its paths), from which its flags are generated
(:func:`lesa.options.add_flags`), and the function that runs it. :func:`main` parses the flags, builds the
options through the schema, checks every destination (:func:`lesa.outputs.guard_outputs`) and only then runs
the command: bad input is one line, exit 2, before any work.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional

from pydantic import AfterValidator, Field

from .classification.config import PRESETS, LayerOptions, TrainConfig
from .convert import WEIGHT_SUFFIXES
from .data import EMBEDDED, DataRoot, Download, Split
from .detection.config import DetConfig
from .detection.evaluate import EVAL_KINDS
from .errors import ConfigError
from .export import EXPORTERS, FORMATS
from .layers.binary import POS_EMBEDS
from .models import ARCHS, OPS
from .options import (
    HIDDEN,
    POSITIONAL,
    ROLE_INPUT,
    ROLE_INPUT_FILE,
    ROLE_INPUT_TREE,
    ROLE_OUTPUT_DIR,
    ROLE_OUTPUT_FILE,
    Checkpoint,
    Device,
    ImageSize,
    Name,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Workers,
    add_flags,
    build,
    flag,
    metavar,
    schema,
)


def suffix_in(*suffixes: str) -> AfterValidator:
    """A file-name check: the name ends with one of ``suffixes``."""
    def check(value: str) -> str:
        if not value.lower().endswith(suffixes):
            raise ValueError(f"use a file name ending in {' or '.join(suffixes)}")
        return value
    return AfterValidator(check)


# each command's options given by position (named in capitals in errors), filled by build_parser
POSITIONALS: dict[tuple[str, Optional[str]], set[str]] = {}


def spelled(args: argparse.Namespace, option: str) -> str:
    """An option as the user wrote it: ``--batch-size``, or ``OUTPUT`` for a positional argument."""
    positionals = POSITIONALS.get((args.command, getattr(args, "det_command", None)), set())
    return option.upper() if option in positionals else flag(option)


def options_from(cls: type, args: argparse.Namespace) -> Any:
    """Build ``cls`` from the flags given (the others are None: the schema's defaults apply), naming each option
    as it was given in errors."""
    values = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "debug", "det_command")}
    return build(cls, values, {k: spelled(args, k) for k in values})


class GivenOnce(argparse.Action):
    """An option that may be given once (argparse would keep the last silently): a second ``--config`` is refused
    with the way to combine two files."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        first = getattr(namespace, self.dest, None)
        if first is not None:
            base = os.path.relpath(os.path.abspath(first), os.path.dirname(os.path.abspath(values)))
            parser.error(f"{option_string} is given twice ({first}, {values}): pass one file; to build one on the "
                         f"other, write 'extends: {base}' in {values} (relative to its folder) and pass "
                         f"{option_string} {values}")
        setattr(namespace, self.dest, values)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the usage itself is in ``--help``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# options of several commands that read a trained classifier
Trained = Annotated[Checkpoint, Field(description="run directory (uses best.pt), checkpoint or weights file, or "
                                                  "shipped weights by name (lesa_resnet_tiny.fashion_mnist)")]
RunData = Annotated[Optional[Name], Field(description="dataset (default: the run's)")]
WeightsModel = Annotated[Optional[Name], Field(description="model name, for a weights-only file")]


def once_each(values: list[Any]) -> list[Any]:
    """A list option that names each value once (a repeated flag adds to the list: ``--ops sa --ops sa``)."""
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"names {', '.join(twice)} more than once: give each once")
    return values


# -- lesa models ---------------------------------------------------------------------------------------
@schema
class ModelsOptions:
    pattern: str = Field("*", description="shell-style filter, e.g. 'lesa_*'", json_schema_extra=POSITIONAL)
    params: bool = Field(False, description="also build each model and count its parameters")


def run_models(args: ModelsOptions) -> int:
    from .models import create_model, list_models
    from .utils import count_params

    names = list_models(args.pattern)
    if not names:
        raise ConfigError(f"no model matches {args.pattern!r}: try 'lesa models' for all, or a pattern like '*lesa*'")
    for name in names:
        print(f"{name:32s} {count_params(create_model(name)) / 1e6:8.2f}M" if args.params else name)
    return 0


# -- lesa convert --------------------------------------------------------------------------------------
@schema
class ConvertOptions:
    input: Checkpoint = Field(description="the authors' checkpoint (.pth), or a lesa classifier's run directory or "
                                    "checkpoint (to a .safetensors that records its model, input size and classes)",
                        json_schema_extra={**ROLE_INPUT_FILE, **POSITIONAL})
    output: Annotated[Name, suffix_in(*WEIGHT_SUFFIXES)] = Field(
        description="output file: .pth/.pt (torch) or .safetensors",
        json_schema_extra={**ROLE_OUTPUT_FILE, **POSITIONAL})
    model: Optional[Name] = Field(None, description="verify that the result loads strictly into this model (e.g. "
                                                    "lesa_resnet50)")
    pos_embed: Optional[Literal[POS_EMBEDS]] = Field(None, description="with --model: the checkpoint's embedding")
    img_size: Optional[ImageSize] = Field(None, description="with --model: input size the checkpoint was trained at")

    def __post_init__(self) -> None:
        given = [flag(k) for k in ("pos_embed", "img_size") if getattr(self, k) is not None]
        if given and not self.model:
            raise ConfigError(f"{' and '.join(given)} describe{'s' if len(given) == 1 else ''} the model of --model, "
                              "which is not given: pass --model NAME, or drop them")


def run_convert(args: ConvertOptions) -> int:
    from .convert import convert_official_state_dict, save_state_dict
    from .errors import CheckpointError
    from .weights import check_state_dict, read_weights

    found = read_weights(args.input)
    if found.task == "detection":
        raise CheckpointError(f"{args.input} is a detection run: lesa convert writes a classifier's or an official "
                              "checkpoint's weights; use the run as it is (lesa det eval / det predict)")
    if not (args.model or found.kind in ("run", "official", "described")):
        raise CheckpointError(f"{args.input} has no LESA keys of the authors' layout (qkv_transform, x_transform, "
                              "bn_similarity, ...): it is not an official LESA checkpoint, and there is nothing to "
                              "convert. To re-save weights lesa loads in another format, pass --model NAME (they are "
                              "checked by loading them); a lesa run's checkpoint, or a weights file that records its "
                              "run, converts as it is")
    # the reader removed wrapper prefixes and converted LESA layouts; convert_official_state_dict also keeps the
    # backbone alone of an mmdetection file without LESA layers
    sd = convert_official_state_dict(found.state_dict)
    if args.model:
        from .models import create_model
        from .models.registry import fitting_options, recorded_options

        given = {k: v for k, v in (("pos_embed", args.pos_embed), ("img_size", args.img_size)) if v}
        kwargs = {**fitting_options(args.model, sd), **recorded_options(args.model, found.config), **given}
        check_state_dict(create_model(args.model, **kwargs), sd, source=args.input)
    from .models.registry import run_description

    description = run_description(found.config) if found.task in (None, "classification") else None
    save_state_dict(sd, args.output, description)
    if description and args.output.lower().endswith(".safetensors"):
        note = f" described as {description['model']} at img_size {description['img_size']}"
    elif description:
        note = " (weights only: a .safetensors output also records the model, input size and classes)"
    else:
        note = ""
    print(f"wrote {len(sd)} tensors to {args.output}{note}")
    return 0


# -- lesa train -----------------------------------------------------------------------------------------
def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action=GivenOnce, help="YAML file with any of the options below, given once (the "
                   "command line overrides it; 'extends: base.yaml' or 'extends: PRESET' in it builds on another file "
                   "or a preset)")
    add_flags(p, TrainConfig)
    add_flags(p, LayerOptions)


def train_options(args: argparse.Namespace) -> Any:
    from .classification import build_config

    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "config", "preset")}
    return build_config(args.config, args.preset, **options)


def run_train(cfg: Any) -> int:
    from .classification import train

    summary = train(cfg)
    if not cfg.quiet and summary:
        print(f"{summary['model']}: val top-1 {summary['val_top1']:.2f}%, top-5 {summary['val_top5']:.2f}% "
              f"after {epochs(summary['epochs'])} ({summary['wall_time_s']:.0f}s) -> {summary['output']}")
        if "test_top1" in summary:
            print(f"test split ({summary['test_images']} images, best.pt = epoch {summary['test_epoch']} by val "
                  f"top-1): top-1 {summary['test_top1']:.2f}%, top-5 {summary['test_top5']:.2f}%")
    return 0


def epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


# -- lesa eval ------------------------------------------------------------------------------------------
@schema
class EvalOptions:
    checkpoint: Trained = Field(json_schema_extra=ROLE_INPUT_FILE)
    data: RunData = Field(None, json_schema_extra=ROLE_INPUT)
    model: WeightsModel = None
    batch_size: PositiveInt = Field(128, description="images per batch")
    workers: Workers = Field(0, description="data-loading processes")
    device: Device = Field("auto", description="auto, cpu or cuda")
    ablate_unary: bool = Field(False, description="remove each query's own attention term S_ii v_i (the paper's "
                                                  "Table 1 ablation)")
    split: Split = "val"
    data_root: DataRoot = None
    download: Download = False
    quiet: bool = Field(False, description="no progress bars")


def run_eval(args: EvalOptions) -> int:
    if args.ablate_unary:
        from .analysis.report import evaluate_without_unary as evaluate
    else:
        from .classification import evaluate_checkpoint as evaluate

    result = evaluate(args.checkpoint, args.data, args.batch_size, args.device, args.workers, args.quiet, args.model,
                      split=args.split, root=args.data_root, download=args.download)
    what = " without the unary term" if args.ablate_unary else ""
    print(f"{result['model']}{what} on {result['data']} ({result['split']}): top-1 {result['top1']:.2f}%, "
          f"top-5 {result['top5']:.2f}%, loss {result['loss']:.4f} ({result['n']} images)")
    return 0


# -- lesa analyze / compare ----------------------------------------------------------------------------
@schema
class AnalyzeOptions:
    run: Trained = Field(json_schema_extra={**ROLE_INPUT_FILE, **POSITIONAL})
    data: RunData = Field(None, json_schema_extra=ROLE_INPUT_TREE)
    model: WeightsModel = None
    output: Optional[Name] = Field(None, description="figure/JSON directory (default RUN/analysis)",
                                   json_schema_extra=ROLE_OUTPUT_DIR)
    layer: Optional[Name] = Field(None, description="layer of the attention map (default: the first SA/LESA layer)")
    query: Optional[Annotated[list[NonNegativeInt], Field(min_length=2, max_length=2)]] = Field(
        None, description="query of the attention map", json_schema_extra=metavar("Y", "X"))
    image_index: NonNegativeInt = Field(0, description="image of the per-image figures, in --split")
    max_batches: Optional[PositiveInt] = Field(None, description="measure the shares on this many batches only")
    split: Split = "val"
    data_root: DataRoot = None
    download: Download = False

    OUTPUT_KINDS: ClassVar[dict[str, tuple[str, ...]]] = {"output": ("analysis",)}

    def default_outputs(self) -> dict[str, str]:
        from .analysis.report import default_analysis_dir

        return {"output": str(default_analysis_dir(Path(self.run)))}

    def planned_outputs(self) -> dict[str, list[str]]:
        from .analysis.report import ANALYSIS_FILES

        return {"output": list(ANALYSIS_FILES)}


def run_analyze(args: AnalyzeOptions) -> int:
    from .analysis.report import analyze_run

    result = analyze_run(args.run, args.data, args.output, args.layer, tuple(args.query) if args.query else None,
                         args.image_index, args.max_batches, root=args.data_root, download=args.download,
                         split=args.split, model_name=args.model)
    shares = result["shares"]
    print(f"{result['model']}: unary {shares['unary_pct']:.2f}% / binary {shares['binary_pct']:.2f}% "
          f"(mean over {len(shares['layers'])} layers)")
    for layer in shares["layers"]:
        print(f"  {layer['name']:18s} {layer['op']:12s} unary {layer['unary_pct']:6.2f}%  "
              f"binary {layer['binary_pct']:6.2f}%")
    print("figures: " + ", ".join(result["figures"]))
    return 0


@schema
class CompareOptions:
    quick: bool = Field(False, description="the tiny models on an embedded set (default digits), 3 seeds; about 30 "
                                           "minutes on 2 CPU cores with --data cluttered-digits")
    arch: Optional[Literal[tuple(ARCHS)]] = Field(None, description="default resnet_tiny with --quick")
    data: Optional[Name] = Field(None, json_schema_extra=ROLE_INPUT, description=(
        "'digits', 'cluttered-digits' (embedded), 'fashion-mnist' or an ImageFolder root"))
    data_root: DataRoot = None
    download: Download = False
    output: Name = Field("runs/compare", description="runs go to OUTPUT/<op>/seed<k>",
                         json_schema_extra=ROLE_OUTPUT_DIR)
    ops: Optional[Annotated[list[Literal[OPS]], Field(min_length=1), AfterValidator(once_each)]] = Field(
        None, description="the operators to compare (default: all)")
    preset: Optional[Literal[PRESETS]] = Field(None, description=(
        "training recipe (default: the embedded set's own: digits, cluttered_digits, fashion_mnist)"))
    epochs: Optional[PositiveInt] = Field(None, description="epochs of each run (default: the preset's)")
    batch_size: Optional[PositiveInt] = Field(None, description="images per process (default: the preset's)")
    lr: Optional[PositiveFloat] = Field(None, description="learning rate (default: the preset's)")
    train_subset: Optional[PositiveInt] = Field(None, json_schema_extra=metavar("N"), description=(
        "train on at most N training images, the same random subset for every run"))
    seeds: Optional[PositiveInt] = Field(None, json_schema_extra=metavar("N"), description=(
        "runs per operation, with seeds SEED..SEED+N-1 (default 3 with --quick, else 1); the tables report mean and "
        "standard deviation over them"))
    seed: NonNegativeInt = Field(0, description="the first seed")
    workers: Optional[Workers] = Field(None, description="data-loading processes of each run")
    max_steps_per_epoch: Optional[PositiveInt] = Field(None, json_schema_extra=HIDDEN)
    quiet: bool = Field(False, description="no progress bars")

    OUTPUT_KINDS: ClassVar[dict[str, tuple[str, ...]]] = {"output": ("compare",)}

    def planned_outputs(self) -> dict[str, list[str]]:
        from .analysis.report import COMPARE_FILES

        return {"output": list(COMPARE_FILES)}


def run_compare(args: CompareOptions) -> int:
    from .analysis.report import COMPARE_FILES, COMPARE_OPS, compare, format_tables
    from .errors import ConfigError

    embedded_presets = {name: name.replace("-", "_") for name in EMBEDDED}  # each embedded set's own recipe
    if args.quick:
        arch, data = args.arch or "resnet_tiny", args.data or "digits"
        own = embedded_presets.get(data, "digits")
        # a set whose own recipe is too long for 15 runs has a shorter one for --quick
        preset, n_seeds = args.preset or (f"{own}_quick" if f"{own}_quick" in PRESETS else own), args.seeds or 3
    else:
        if not args.data or not args.arch:
            raise ConfigError("pass --arch and --data (e.g. --arch resnet50 --data /data/imagenet --preset "
                              "imagenet), or --quick for the tiny models on the embedded digits")
        arch, data = args.arch, args.data
        preset, n_seeds = args.preset or embedded_presets.get(data), args.seeds or 1
    options = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "train_subset", "workers",
                                             "max_steps_per_epoch",
                                             "data_root", "download") if getattr(args, k) is not None}
    rows = compare(arch, data, args.output, tuple(args.ops or COMPARE_OPS), preset, args.quiet,
                   seeds=tuple(range(args.seed, args.seed + n_seeds)), **options)
    print(format_tables(rows, f"{arch} on {data}"))
    print(f"wrote {args.output}/" + ", ".join(COMPARE_FILES))
    return 0


# -- lesa det train / eval / predict -------------------------------------------------------------------
@schema
class DetEvalOptions:
    checkpoint: Name = Field(description="run directory (best.pt) or checkpoint", json_schema_extra=ROLE_INPUT_FILE)
    data: Optional[Name] = Field(None, description="COCO root (default: the run's)", json_schema_extra=ROLE_INPUT_TREE)
    device: Device = Field("auto", description="auto, cpu or cuda")
    max_images: Optional[PositiveInt] = Field(None, json_schema_extra=metavar("N"),
                                              description="evaluate the first N validation images only (default: all)")
    output: Optional[Name] = Field(None, description="write coco_eval.json here (default: the run directory)",
                                   json_schema_extra=ROLE_OUTPUT_DIR)

    OUTPUT_KINDS: ClassVar[dict[str, tuple[str, ...]]] = {"output": EVAL_KINDS}

    def planned_outputs(self) -> dict[str, list[str]]:
        return {"output": ["coco_eval.json"]}

    def default_outputs(self) -> dict[str, str]:
        checkpoint = Path(self.checkpoint)
        try:
            run = checkpoint.is_dir()
        except OSError:  # e.g. a name too long to look up: the checkpoint reader names it in one line
            run = False
        return {"output": str(checkpoint if run else checkpoint.parent)}


@schema
class DetPredictOptions:
    images: Annotated[list[Name], Field(min_length=1)] = Field(
        description="image files", json_schema_extra={**ROLE_INPUT, **POSITIONAL})
    checkpoint: Name = Field(description="run directory (best.pt) or checkpoint of a detector",
                             json_schema_extra=ROLE_INPUT_FILE)
    output: Name = Field(description="directory for the PNGs", json_schema_extra=ROLE_OUTPUT_DIR)
    score_threshold: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="keep detections scoring at least this")
    device: Device = Field("auto", description="auto, cpu or cuda")

    OUTPUT_KINDS: ClassVar[dict[str, tuple[str, ...]]] = {"output": ("predictions",)}

    def planned_outputs(self) -> dict[str, list[str]]:
        from .detection.predict import output_names

        return {"output": output_names(self.images)}


def _det_flags(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="det_command", metavar="{train,eval,predict}", required=True)
    helps = {
        "train": "train a detector (default: Mask R-CNN on the embedded digit scenes)",
        "eval": "COCO box and mask AP of a trained detector (the run's categories)",
        "predict": "draw a detector's boxes, labels, scores and masks on images (an image that cannot be read is "
                   "named, skipped, and makes the exit code 2)",
    }
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, text in helps.items()}
    parsers["train"].add_argument("--config", action=GivenOnce, help="YAML file with any of the options below, given "
                                  "once ('extends: base.yaml' or 'extends: htc' in it builds on another file or a "
                                  "preset)")
    add_flags(parsers["train"], DetConfig)
    add_flags(parsers["eval"], DetEvalOptions)
    add_flags(parsers["predict"], DetPredictOptions)


def det_options(args: argparse.Namespace) -> Any:
    if args.det_command == "train":
        from .detection.config import build_det_config

        options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "det_command", "config")}
        return build_det_config(args.config, **options)
    return options_from(DetEvalOptions if args.det_command == "eval" else DetPredictOptions, args)


def run_det(args: Any) -> int:
    if isinstance(args, DetEvalOptions):
        return _det_eval(args)
    if isinstance(args, DetPredictOptions):
        return _det_predict(args)
    from .detection.config import NAMES, has_masks
    from .detection.task import train_detector

    summary = train_detector(args)
    if not args.quiet:
        mask = f", mask AP {_ap(summary['segm_AP'])}" if has_masks(summary["detector"]) else ""
        print(f"{NAMES[summary['detector']]} + {summary['backbone']}: box AP {_ap(summary['bbox_AP'])}{mask} after "
              f"{epochs(summary['epochs'])} ({summary['wall_time_s']:.0f}s) -> {summary['output']}")
    return 0


def _ap(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def _det_eval(args: DetEvalOptions) -> int:
    from .detection.evaluate import evaluate_run

    result, path = evaluate_run(args.checkpoint, args.data, args.device, args.max_images, args.output)
    print(result["data"])
    if result["skipped_images"]:
        print(f"lesa det eval: {len(result['skipped_images'])} image(s) could not be decoded and are left out of AP "
              f"(ids {result['skipped_images'][:10]}; the warnings name the files)", file=sys.stderr)
    for iou_type in ("bbox", "segm"):
        if iou_type in result:
            print(f"{iou_type:5s} " + "  ".join(f"{k} {_ap(v):>5}" for k, v in result[iou_type].items()))
    missing = [c["name"] for c in result["categories"] if not c["ground_truth"]]
    if missing:
        print(f"AP over the {len(result['categories']) - len(missing)} categories with ground truth here; none for "
              f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}")
    print(f"wrote {path}")
    return 0


def _det_predict(args: DetPredictOptions) -> int:
    """Draw each image; one that cannot be read is named on stderr and skipped, and the exit code is then 2."""
    from .detection.predict import predict_images

    failed = []

    def skip(err: Exception) -> None:
        failed.append(err)
        print(f"lesa det predict: skipped: {err}", file=sys.stderr)

    done = 0
    for image, kept, target in predict_images(args.checkpoint, args.images, args.output, args.score_threshold,
                                              args.device, on_bad_image=skip):
        print(f"{image}: {kept} detections -> {target}")
        done += 1
    if failed:
        rest = f"{done} drawn" if done else "none drawn"
        print(f"lesa det predict: {len(failed)} image(s) could not be read (named above); {rest}", file=sys.stderr)
        return 2
    return 0


# -- lesa export ---------------------------------------------------------------------------------------
@schema
class ExportOptions:
    checkpoint: Checkpoint = Field(description="a classifier: run directory (uses best.pt), training checkpoint or "
                                               "weights file", json_schema_extra={**ROLE_INPUT_FILE, **POSITIONAL})
    output: Annotated[Name, suffix_in(*FORMATS)] = Field(
        description="out.onnx (ONNX, through torch.export; needs pip install 'lesa[export]') or out.pt2 (a "
                    "torch.export program)", json_schema_extra={**ROLE_OUTPUT_FILE, **POSITIONAL})
    model: WeightsModel = None
    batch_size: Optional[PositiveInt] = Field(None, description="fix the graph's batch size (default: any batch size)")
    exporter: Literal[EXPORTERS] = Field("dynamo", description=(
        "ONNX exporter: dynamo (torch.export) or torchscript (torch.onnx.export(dynamo=False), as timm's onnx_export "
        "and many TensorRT / OpenVINO pipelines)"))
    opset: Optional[PositiveInt] = Field(None, description="ONNX opset version (default: the exporter's; 17 for "
                                                           "torchscript)")
    no_check: bool = Field(False, description="do not run the exported graph (onnxruntime / torch.export) against "
                                              "eager PyTorch")


def run_export(args: ExportOptions) -> int:
    from .classification import load_trained_model
    from .export import export_model

    model, cfg = load_trained_model(args.checkpoint, args.model)
    result = export_model(model, args.output, batch_size=args.batch_size, opset=args.opset, check=not args.no_check,
                          exporter=args.exporter)
    shape = result["input_shape"]
    dims = ["N" if result["dynamic_batch"] else str(shape[0])] + [str(d) for d in shape[1:]]
    inputs = f"input ({', '.join(dims)})" + (" for any N" if result["dynamic_batch"] else "")
    if result["max_rel_error"] is not None:
        checked = f"matches eager PyTorch under {result['checked_with']} (max error {result['max_rel_error']:.1e} " \
                  "of the output's scale)"
    else:
        checked = result["checked_with"] or "not checked (--no-check)"
    print(f"{cfg['model']} -> {result['path']} ({result['format']}, {inputs}): {checked}")
    return 0


def _plain(help_text: str, cls: type, run: Callable[[Any], int]) -> Command:
    """A command whose flags are those of ``cls``, built into ``cls`` and run by ``run``."""
    return help_text, lambda p: add_flags(p, cls), lambda args: options_from(cls, args), run


# name: (help, add the flags, build the options from the flags, run with the options)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any],
                Callable[[Any], int]]
COMMANDS: dict[str, Command] = {
    "train": ("train a classifier (default: lesa_resnet_tiny on the embedded digits)", _train_flags, train_options,
              run_train),
    "eval": _plain("evaluate a checkpoint: top-1 / top-5 and loss", EvalOptions, run_eval),
    "analyze": _plain("unary/binary shares and figures of a trained run", AnalyzeOptions, run_analyze),
    "compare": _plain("train conv/SA/AA/static-LESA/LESA alike and tabulate (Tables 1, 2, 6)", CompareOptions,
                      run_compare),
    "det": ("detection and instance segmentation: train / eval / predict", _det_flags, det_options, run_det),
    "convert": _plain("convert an official LESA checkpoint to lesa's layout, or a run to a weights file",
                      ConvertOptions, run_convert),
    "models": _plain("list the available models", ModelsOptions, run_models),
    "export": _plain("export a classifier to ONNX or a torch.export program, checked against eager PyTorch",
                     ExportOptions, run_export),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(prog="lesa", description="Locally Enhanced Self-Attention")
    parser.add_argument("--version", action="version", version=f"lesa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error (or LESA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    for name, command in _subparsers(parser).items():
        for sub_name, sub in (_subparsers(command) or {None: command}).items():
            POSITIONALS[(name, sub_name)] = {a.dest for a in sub._actions if not a.option_strings}
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. A user error (:class:`lesa.errors.LesaError`) prints one line and returns its exit
    code (2 for bad input); anything else is a bug and keeps its traceback. ``--debug`` or ``LESA_DEBUG=1``
    shows the traceback of every error."""
    from .errors import LesaError
    from .outputs import guard_outputs, input_paths
    from .ownership import running

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, _, make_options, run = COMMANDS[args.command]
    prog = " ".join(["lesa", args.command] + ([args.det_command] if getattr(args, "det_command", None) else []))
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"
    try:
        options = make_options(args)
        extra = [args.config] if getattr(args, "config", None) else []
        guard_outputs(options, {name: spelled(args, name) for name in vars(args)}, extra)
        with running(" ".join(["lesa", *(shlex.quote(str(a)) for a in argv or sys.argv[1:])]),
                     input_paths(options) + extra):
            return run(options) or 0
    except LesaError as err:
        if args.debug or os.environ.get("LESA_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(err).split())  # one line
        print(f"{prog}: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
