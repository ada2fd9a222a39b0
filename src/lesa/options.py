"""One schema for every option of every command and of the YAML files.

Each command's options are a :func:`schema` dataclass (pydantic v2, strict): a field's annotation is its
type *and* its range (``PositiveInt``, ``Fraction``, ``Device``, a ``Literal`` of choices, ...); NaN and
infinities are refused wherever a number is meant; unknown options are errors. :func:`build` makes the
options from plain values and turns every validation failure into one :class:`~lesa.errors.ConfigError`
that names the option as the user wrote it (``--batch-size`` on the command line, ``batch_size in
run.yaml`` in a file), the value, and the fix. The training configurations (``lesa.classification.TrainConfig``,
``lesa.detection.config.DetConfig``) and the other commands' options (``lesa.cli``) are all built this way.

Fields may carry a role (``Field(json_schema_extra=ROLE_...)``): the paths a command reads (``input``) and
the places it writes (``output_dir`` / ``output_file``), so that :func:`lesa.outputs.guard_outputs` can
check every destination, against every input, before any work starts.

The command line is generated from the same fields (:func:`add_flags`): each option is declared once, with its
type, range, choices, default and help (``Field(description=...)``); how it is given is said beside its role
(:data:`POSITIONAL`, :data:`NEGATABLE`, :data:`HIDDEN`, :data:`NO_FLAG`, :func:`metavar`).

YAML files (:func:`load_yaml`) must be UTF-8 mappings without duplicate keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import pydantic
import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from .errors import ConfigError, LesaError, NotFoundError

OPTIONS = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # a share of something: 0 <= x < 1
Name = Annotated[str, Field(min_length=1)]  # a model name, a dataset, a path: never empty
Workers = Annotated[int, Field(ge=0, le=256)]  # data-loading processes: more only exhausts the machine
ImageSize = Annotated[int, Field(ge=1, le=16384)]  # pixels a side: the position tables grow with its square

# roles of path fields (see the module docstring)
ROLE_INPUT = {"role": "input"}
ROLE_INPUT_FILE = {"role": "input_file"}  # a file (or run folder) that must exist: named before any output problem
ROLE_INPUT_TREE = {"role": "input_tree"}  # a dataset folder: read recursively, so nothing is written inside
ROLE_OUTPUT_DIR = {"role": "output_dir"}
ROLE_OUTPUT_FILE = {"role": "output_file"}

# how a field is given on the command line (beside its role, e.g. ``json_schema_extra={**ROLE_INPUT,
# **POSITIONAL}``); a field that says nothing is a flag ``--name-with-dashes``
POSITIONAL = {"flag": "positional"}  # by position, named in capitals in errors (OUTPUT)
NEGATABLE = {"flag": "negatable"}  # a yes/no option whose default is decided later: --x and --no-x
HIDDEN = {"flag": "hidden"}  # a flag left out of --help (smoke tests)
NO_FLAG = {"flag": "none"}  # an option of files only: structured values, recipe details


def metavar(*names: str) -> dict[str, Any]:
    """The placeholder(s) ``--help`` shows for a flag's value(s): ``metavar("N")``, ``metavar("Y", "X")``."""
    return {"metavar": names[0] if len(names) == 1 else names}


T = TypeVar("T")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` that this machine has.

    Raises:
        ValueError: an unknown spelling, or a device this machine does not have (with the fix).
    """
    if not _DEVICE.match(value):
        raise ValueError("a device is auto, cpu, cuda or cuda:N (N a GPU index)")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use auto or cpu")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s) (0 to "
                             f"{torch.cuda.device_count() - 1})")
    if value == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available on this machine; use auto or cpu")
    return value


Device = Annotated[str, AfterValidator(check_device)]


def shipped_or_path(value: str) -> str:
    """A checkpoint option: a path as given, or the shipped weights a tagged model name names
    (``lesa_resnet_tiny.fashion_mnist``, as in timm)."""
    from .models.pretrained import shipped_file

    found = shipped_file(value)
    return str(found) if found is not None else value


Checkpoint = Annotated[str, Field(min_length=1), AfterValidator(shipped_or_path)]


def schema(cls: type[T]) -> type[T]:
    """Make ``cls`` a validated options dataclass (strict types, finite numbers, no unknown options)."""
    return pydantic.dataclasses.dataclass(config=OPTIONS)(cls)


def option_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def flag(option: str) -> str:
    """The command-line spelling of an option (``batch_size`` -> ``--batch-size``)."""
    return "--" + option.replace("_", "-")


# -- the command line -----------------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add an argument to ``parser`` for each option of ``cls`` (a :func:`schema` class), in field order: its
    type, choices and count of values from the annotation, its help from ``Field(description=...)`` followed by
    the schema's default, its form from the field's ``json_schema_extra`` (see the module docstring).

    Every argument's default is None, "not given": the schema's default applies when the options are built, so
    a config file's value is not overridden by a default the user did not type.
    """
    for name, info in cls.__pydantic_fields__.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        form = extra.get("flag")
        if form == NO_FLAG["flag"]:
            continue
        kwargs = {**_value_kwargs(name, info, form), "default": None, "help": _help(info, form)}
        if "metavar" in extra:
            kwargs["metavar"] = extra["metavar"]
        if form == POSITIONAL["flag"]:
            if not info.is_required() and "nargs" not in kwargs:
                kwargs["nargs"] = "?"
            parser.add_argument(name, **kwargs)
        else:
            parser.add_argument(flag(name), dest=name, required=info.is_required(), **kwargs)


def _value_kwargs(name: str, info: FieldInfo, form: Optional[str]) -> dict[str, Any]:
    """``type`` / ``choices`` / ``nargs`` / ``action`` of the option ``name``, from its annotation."""
    kind, metadata = _unwrapped(info.annotation, info.metadata)
    if get_origin(kind) is list:
        item, _ = _unwrapped(get_args(kind)[0], [])
        nargs = _nargs(metadata)
        # a repeated flag adds to a list of any length (``--ops a --ops b``); a fixed-length one is one value
        action = _Once if isinstance(nargs, int) else "extend"
        return {**_scalar_kwargs(name, item), "nargs": nargs, "action": action}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if form == NEGATABLE["flag"] else "store_true"}
    return _scalar_kwargs(name, kind)


class _Once(argparse.Action):
    """Store the values of a fixed-length list flag, refusing it given twice (argparse would keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 -- argparse's signature
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice: give it once, with {self.nargs} values")
        setattr(namespace, self.dest, values)


def _unwrapped(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """``annotation`` without ``Optional`` and ``Annotated``, and the constraints found on the way."""
    found = list(metadata)
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *more = get_args(annotation)
            found += [m for item in more for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        elif origin in (Union, types.UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation, found


def _scalar_kwargs(name: str, kind: Any) -> dict[str, Any]:
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        return {"choices": choices, "type": type(choices[0])}
    if kind in (int, float):
        return {"type": kind}
    if kind is str:
        return {}
    raise TypeError(f"option {name} ({kind}) has no command-line form; declare it json_schema_extra=NO_FLAG")


def _nargs(metadata: list[Any]) -> int | str:
    """A list's count of values: fixed where its length is (``--query Y X``), else one or more, or any."""
    low = max((m.min_length for m in metadata if getattr(m, "min_length", None) is not None), default=0)
    high = min((m.max_length for m in metadata if getattr(m, "max_length", None) is not None), default=None)
    if high == low:
        return low
    return "+" if low >= 1 else "*"


def _help(info: FieldInfo, form: Optional[str]) -> Optional[str]:
    if form == HIDDEN["flag"]:
        return argparse.SUPPRESS
    text = " ".join(part for part in (info.description, default_note(info)) if part)
    return text.replace("%", "%%") or None  # argparse formats help with %


def default_note(info: FieldInfo) -> Optional[str]:
    """``(default: VALUE)`` for ``--help``: the schema's default, where it is a value (not None, not a switch's
    False, not an empty list)."""
    if info.is_required():
        return None
    default = info.get_default(call_default_factory=True)
    if default is None or default is False or (isinstance(default, (list, tuple)) and not default):
        return None
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return f"(default: {shown})"


def build(cls: type[T], values: dict[str, Any], sources: Optional[dict[str, str]] = None) -> T:
    """``cls(**values)``, with every problem as one :class:`ConfigError`.

    ``sources`` maps an option to how the user wrote it (``'--batch-size'``, ``'batch_size in run.yaml'``);
    options not in it are named as ``cls``'s fields.

    Raises:
        ConfigError: an unknown option (with the closest valid names), a value of the wrong type, out of
            range or not finite, or a combination of values that cannot work.
    """
    sources = sources or {}
    known = option_names(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        # the options a schema takes beside its fields (a run's layer options, moved into model_kwargs before)
        valid = known + list(getattr(cls, "LAYER_OPTIONS", ()))
        hints = [f"{sources.get(k, k)}{_closest(k, valid)}" for k in unknown]
        raise ConfigError(f"unknown option(s) {', '.join(hints)}; valid options: {', '.join(sorted(valid))}")
    try:
        return cls(**values)
    except ValidationError as err:
        for error in err.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, LesaError):  # a cross-option check in __post_init__: already says it all
                raise cause from None
        raise ConfigError("; ".join(describe(e, sources) for e in err.errors()[:3])) from None


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def describe(error: dict[str, Any], sources: dict[str, str]) -> str:
    """One pydantic error as ``OPTION: got VALUE; FIX``."""
    loc = [str(part) for part in error["loc"]]
    field = loc[0] if loc else "options"
    where = sources.get(field, field) + "".join(f"[{part}]" for part in loc[1:])
    value = error.get("input")
    return f"{where}: got {_show(value)}; {_fix(error)}"


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _fix(error: dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        return "use a value " + bounds[kind].format(**ctx)
    fixes = {
        "finite_number": "give a finite number (not NaN or infinity)",
        "int_type": "give a whole number, e.g. 4",
        "float_type": "give a number, e.g. 0.1",
        "bool_type": "give true or false",
        "string_type": "give a text value",
        "list_type": "give a list, e.g. [1, 2]",
        "dict_type": "give a mapping of name: value",
        "string_too_short": "give a non-empty value",
        "literal_error": f"choose one of {ctx.get('expected', '')}",
    }
    text = error.get("input")
    if kind == "float_type" and isinstance(text, str) and "e" in text.lower() and _is_number(text):
        return "YAML reads a number like 1e-3 as text: write 1.0e-3 or 0.001"
    if kind in fixes:
        return fixes[kind]
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"][:1].lower() + error["msg"][1:]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- YAML ---------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges a mapping: its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            lines = f"lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
            raise yaml.constructor.ConstructorError(None, None, f"option {key!r} is given twice ({lines}); keep one",
                                                    key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The options in a YAML file: a UTF-8 mapping (a byte-order mark is fine) with each key once.

    Raises:
        NotFoundError: the file does not exist.
        ConfigError: not UTF-8, not valid YAML, a key given twice, or not a mapping (each with the line).
    """
    path = Path(path)
    try:
        is_file = path.is_file()
        raw = path.read_bytes() if is_file else b""
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, no permission
        raise ConfigError(f"config file {str(path)[:80]!r} cannot be read ({err.__class__.__name__}: "
                          f"{getattr(err, 'strerror', None) or err}); pass a readable YAML file") from None
    if not is_file:
        raise NotFoundError(f"config file {str(path)!r} does not exist" +
                            (" (it is a directory)" if path.is_dir() else ""))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 (byte 0x{raw[err.start]:02x} on line {line}); "
                          "save it as UTF-8") from None
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{line}: {getattr(err, 'problem', err)}") \
            from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value (e.g. `epochs: 10`)")
    return values
