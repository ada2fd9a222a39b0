"""Weights shipped inside the package: the tiny models trained on Fashion-MNIST (Xiao, Rasul, Vollgraf,
*Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms*, arXiv 1708.07747).

Each file is ``lesa/pretrained/<model>.<tag>.safetensors`` (float16 weights; loading casts them to the
model's dtype). Its safetensors metadata holds, under the key ``lesa``, a JSON object with what
``pretrained_cfg`` reports — the data, the input size, the class names, the test top-1 measured with the
stored weights, the licence and the command that trained it — so that no fact is written twice: the file
describes itself. ``tools/ship_pretrained.py`` writes the files from finished runs.
"""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional

TAG = "fashion_mnist"  # the one set weights are shipped for
FOLDER = "pretrained"  # inside the lesa package


def pretrained_path(name: str, tag: str = TAG) -> Optional[Path]:
    """The shipped weights file of model ``name`` (``None`` where none ships)."""
    path = Path(str(resources.files("lesa").joinpath(FOLDER, f"{name}.{tag}.safetensors")))
    return path if path.is_file() else None


def shipped_models(tag: str = TAG) -> list[str]:
    """Models with shipped weights, sorted."""
    folder = Path(str(resources.files("lesa").joinpath(FOLDER)))
    suffix = f".{tag}.safetensors"
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def file_metadata(path: str | Path) -> Optional[Any]:
    """The JSON under the key ``lesa`` of a safetensors file's metadata; ``None`` for any other file (not
    safetensors, unreadable — the weights reader names that problem — or without the key)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("lesa", "null"))
    except Exception:  # any failure to read: not a described file
        return None


@cache
def pretrained_info(name: str, tag: str = TAG) -> Optional[dict[str, Any]]:
    """The description stored in the shipped file of ``name`` (see the module docstring), or ``None``."""
    path = pretrained_path(name, tag)
    return None if path is None else file_metadata(path)


def file_description(path: str | Path) -> Optional[dict[str, Any]]:
    """The run a weights file describes in its metadata (a shipped file, one ``tools/ship_pretrained.py`` or
    ``lesa convert RUN OUT.safetensors`` wrote:
    :func:`lesa.models.registry.run_description`): ``model``, ``img_size`` and ``classes``, the ``model_kwargs`` it
    was built with where any, and ``data`` where the command that trained it named a ``--data``; ``None`` for
    any other file (no safetensors, no ``lesa`` metadata, or metadata without the first three)."""
    info = file_metadata(path)
    if not (isinstance(info, dict) and isinstance(info.get("model"), str) and isinstance(info.get("img_size"), int)
            and isinstance(info.get("classes"), list)):
        return None
    described = dict(model=info["model"], img_size=info["img_size"], classes=[str(c) for c in info["classes"]])
    if isinstance(info.get("model_kwargs"), dict) and info["model_kwargs"]:
        described["model_kwargs"] = info["model_kwargs"]
    data = info.get("data") if "command" not in info else _option(str(info["command"]), "--data")
    return {**described, "data": data} if isinstance(data, str) and data else described


def _option(command: str, flag: str) -> Optional[str]:
    """The value of ``flag`` in a command line (``None`` where it is not given)."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return None
    return next((b for a, b in zip(words, words[1:]) if a == flag), None)


def pretrained_cfg_fields(name: str, tag: str = TAG) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields of the shipped weights of ``name``: ``file``, ``tag``, ``num_classes``,
    ``label_names``, ``license``, ``description`` (data and test top-1), ``origin_url``, ``notes`` (the
    command that trained them). ``{}`` where none ship. The input size is the model's own option
    (``img_size``), given by :func:`pretrained_kwargs`."""
    info = pretrained_info(name, tag)
    if info is None:
        return {}
    return dict(
        file=str(pretrained_path(name, tag)), tag=tag, num_classes=len(info["classes"]),
        label_names=tuple(info["classes"]), license=info["license"], origin_url=info["data_url"],
        description=(f"{name} trained on {info['data']} ({info['train_images']} training images, "
                     f"{info['epochs']} epochs): test top-1 {info['test_top1']:.2f}%, top-5 "
                     f"{info['test_top5']:.2f}% on the {info['test_images']} test images"),
        notes=(f"test_top1={info['test_top1']:.2f}", f"trained with: {info['command']}"),
    )


def pretrained_kwargs(name: str, tag: str = TAG) -> dict[str, Any]:
    """The model options the shipped weights were trained with (``img_size``, ``num_classes``)."""
    info = pretrained_info(name, tag)
    return {} if info is None else dict(img_size=info["img_size"], num_classes=len(info["classes"]))


def shipped_file(value: str) -> Optional[Path]:
    """The shipped file a ``NAME.TAG`` (timm's tagged name, e.g. ``lesa_resnet_tiny.fashion_mnist``) names, where
    no file or folder of that name exists here (a user's own file always wins); ``None`` otherwise."""
    name, dot, tag = str(value).rpartition(".")
    if not dot or not name or "/" in str(value):
        return None
    try:
        if Path(value).exists():
            return None
        return pretrained_path(name, tag)
    except (OSError, ValueError):  # a name too long, a NUL byte: no shipped file has it
        return None
