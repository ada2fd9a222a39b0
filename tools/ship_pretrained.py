"""Write the package's shipped weights (``src/lesa/pretrained/<model>.fashion_mnist.safetensors``) from finished
Fashion-MNIST runs: each run's ``best.pt`` in float16, described in the file's metadata (see
:mod:`lesa.models.pretrained`), with the test top-1 measured again on the stored float16 weights.

    python tools/ship_pretrained.py RUN [RUN ...]

A run is a ``lesa train --data fashion-mnist`` (or ``lesa compare``) run directory with ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from lesa.classification import evaluate_model, load_trained_model
from lesa.classification.config import PRESETS
from lesa.engine.checkpoint import load_checkpoint
from lesa.engine.config import preset_values
from lesa.models.pretrained import FOLDER, TAG

DATA = "fashion-mnist"
DATA_URL = "https://github.com/zalandoresearch/fashion-mnist"
LICENSE = "MIT (the weights, as lesa; the Fashion-MNIST photos: MIT, Zalando SE)"
COMMAND_OPTIONS = ("epochs", "batch_size", "lr", "train_subset", "img_size")  # named where they differ from the preset


def command(cfg: dict) -> str:
    """The ``lesa train`` command that reproduces a run: its preset, model, seed and what it changed."""
    preset = cfg.get("preset")
    base = preset_values(preset, PRESETS) if preset else {}
    words = ["lesa train", f"--data {DATA}", f"--model {cfg['model']}"] + ([f"--preset {preset}"] if preset else [])
    words += [f"--{k.replace('_', '-')} {cfg[k]}" for k in COMMAND_OPTIONS
              if cfg.get(k) is not None and cfg.get(k) != base.get(k)]
    return " ".join(words + [f"--seed {cfg.get('seed', 0)}"])


def ship(run: Path, out_dir: Path) -> Path:
    config = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    if config.get("data") != DATA:
        sys.exit(f"{run}: trained on {config.get('data')!r}, not {DATA}; pass a Fashion-MNIST run")
    model, cfg = load_trained_model(run)
    identity = load_checkpoint(run / "best.pt", kind="classification")["data_identity"]
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict(half)  # measure what ships: the float16 weights
    test = evaluate_model(model, DATA, cfg["img_size"], model_name=cfg["model"], classes=cfg.get("classes"),
                          split="test", root=config.get("data_root"), quiet=True)
    info = dict(model=cfg["model"], data="Fashion-MNIST", data_url=DATA_URL, license=LICENSE,
                classes=list(cfg["classes"]), img_size=cfg["img_size"],
                train_images=identity["train_images"],
                epochs=config["epochs"], val_top1=round(summary["val_top1"], 2),
                test_top1=round(test["top1"], 2), test_top5=round(test["top5"], 2), test_images=test["n"],
                command=command({**config, **cfg}), paper="arXiv:2107.05637")
    out = out_dir / f"{cfg['model']}.{TAG}.safetensors"
    save_file(half, str(out), metadata={"lesa": json.dumps(info)})
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, test top-1 {info['test_top1']:.2f}% ({info['command']})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "lesa" / FOLDER)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    for run in args.runs:
        ship(run, args.out)


if __name__ == "__main__":
    main()
