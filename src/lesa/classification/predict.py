"""A classifier and its inputs: the data as a model takes it (its input size and normalisation, for training
and inference alike), and a trained classifier from any file lesa reads (a run directory's ``best.pt``, a
training checkpoint, a weights file, shipped weights by name) with its run's configuration.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..data import build_classification_data
from ..errors import CheckpointError, ConfigError
from ..models import create_model, default_cfg
from ..models.registry import fitting_options
from ..weights import load_state, read_weights, shared_prefix_note


def model_img_size(model: str, img_size: Optional[int] = None) -> int:
    return img_size or default_cfg(model)["input_size"][-1]


def classification_data(model: str, data: str, img_size: int, train: bool = True, root: Optional[str] = None,
                        download: bool = False):
    inputs = default_cfg(model)
    return build_classification_data(data, img_size, train=train, mean=inputs["mean"], std=inputs["std"],
                                     crop_pct=inputs["crop_pct"], root=root, download=download)


def read_classifier(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of a classifier's run directory (its ``best.pt``), training checkpoint or weights file, and
    its run's configuration with its ``classes`` (``{}`` for a bare weights file).

    Raises:
        NotFoundError, CheckpointError: an unreadable file (:func:`lesa.weights.read_weights`), a detection
            run, or weights without a classifier.
    """
    found = read_weights(checkpoint, task="classification")
    sd = found.state_dict
    if "fc.weight" not in sd:
        raise CheckpointError(f"{checkpoint}: no classifier weights (fc.weight) found{shared_prefix_note(sd)}; is "
                              "this a lesa classification model? (a detector: use `lesa det eval`)")
    return sd, found.config


def load_trained_model(checkpoint: str | Path, model_name: Optional[str] = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory (its ``best.pt``), a training checkpoint or a weights file, with the
    run's configuration (``{}`` for a bare weights file, which then needs ``model_name``)."""
    sd, cfg = read_classifier(checkpoint)
    if model_name and cfg.get("model") and model_name != cfg["model"]:
        raise ConfigError(f"{checkpoint} holds a {cfg['model']} (the file records it), not a {model_name}: drop "
                          f"--model, or pass --model {cfg['model']}")
    name = model_name or cfg.get("model")
    if not name:
        raise ConfigError(f"{checkpoint} holds weights only: pass the model name (--model NAME)")
    # a bare weights file records no options: those its tensors show (position tables) stand in for them
    options = {**(fitting_options(name, sd) if not cfg else {}), **cfg.get("model_kwargs", {})}
    img_size = model_img_size(name, cfg.get("img_size") or options.pop("img_size", None))
    model = create_model(name, num_classes=sd["fc.weight"].shape[0], img_size=img_size, **options)
    load_state(model, sd, checkpoint)
    cfg.update(model=name, img_size=img_size)
    return model, cfg
