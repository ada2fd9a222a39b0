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

YAML files (:func:`load_yaml`) must be UTF-8 mappings without duplicate keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import pydantic
import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError

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
ROLE_INPUT_TREE = {"role": "input_tree"}  # a dataset folder: read recursively, so nothing is written inside
ROLE_OUTPUT_DIR = {"role": "output_dir"}
ROLE_OUTPUT_FILE = {"role": "output_file"}

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
        hints = [f"{sources.get(k, k)}{_closest(k, known)}" for k in unknown]
        raise ConfigError(f"unknown option(s) {', '.join(hints)}; valid options: {', '.join(sorted(known))}")
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
