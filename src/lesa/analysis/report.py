"""``lesa analyze RUN_DIR`` and ``lesa compare``: the paper's analyses of trained runs.

``analyze_run`` measures a run's unary/binary shares on its validation set and draws the per-layer
shares, the fusion gate of one image and one query's attention. ``compare`` trains the conv, SA, AA,
static-LESA and LESA variants of an architecture with one recipe, once per seed, evaluates SA without its
unary term, and lays the results out as the paper's Tables 1, 2 and 6 (``compare.json``, ``compare.md``;
mean ± sample standard deviation over the seeds) with the training curves of all runs in one figure
(Fig. 5, spread bands over the seeds).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..classification import build_config, evaluate_checkpoint, load_trained_model, train
from ..classification.evaluate import class_map, folder_fingerprints, run_data, suggested_data
from ..classification.task import CURVE_METRIC
from ..data import build_classification_data
from ..engine import load_checkpoint
from ..engine.records import plot_curves, read_metrics_csv, write_json
from ..errors import ConfigError
from ..layers import ablate_unary
from ..models.pretrained import FOLDER as PRETRAINED_FOLDER
from ..models.registry import model_name
from ..models.resnet import OPS
from ..outputs import check_not_inside
from ..ownership import check_folder, claim
from ..utils import atomic_write
from .figures import plot_attention_map, plot_gate_maps, plot_shares
from .maps import attention_layers_with_maps, attention_map, gate_maps
from .shares import unary_binary_shares

COMPARE_OPS = OPS  # compare trains every operation, in this order
OP_LABELS = {"conv": "Convolution", "sa": "Self-Attention", "aa": "AA", "static_lesa": "Static LESA",
             "lesa": "LESA", "sa_minus_unary": "SA - unary term"}
SEED_METRICS = ("val_top1", "val_top5", "val_loss", "unary_pct", "binary_pct")
TEST_METRICS = ("test_top1", "test_top5", "wall_time_min")  # where the data has a test split
ANALYSIS_FILES = ("shares.json", "shares.png", "gate_maps.png", "attention_map.png", "curves.png")
COMPARE_FILES = ("compare.json", "compare.md", "compare_curves.png", "compare_shares.png")


def analyze_run(run: str | Path, data: Optional[str] = None, output: Optional[str | Path] = None,
                layer: Optional[str] = None, query: Optional[tuple[int, int]] = None, image_index: int = 0,
                max_batches: Optional[int] = None, batch_size: int = 128, root: Optional[str] = None,
                download: bool = False, split: str = "val", model_name: Optional[str] = None) -> dict[str, Any]:
    """Shares (``shares.json``) and figures (``shares.png``, ``gate_maps.png``, ``attention_map.png``,
    ``curves.png``) of a trained run on the ``split`` (``'val'``, or ``'test'`` where the data has one) of
    ``data`` (default: the run's, found where the run found it; ``root`` / ``download`` as
    :func:`lesa.data.build_classification_data`), in ``output`` (default: :func:`default_analysis_dir`);
    ``model_name`` builds a weights-only file (as ``lesa eval --model``).

    Raises:
        ConfigError: ``split='test'`` for data without a test split; an ``image_index`` outside the split.
    """
    run = Path(run)
    model, cfg = load_trained_model(run, model_name)
    if not (data or cfg.get("data")):
        raise ConfigError(f"no data: pass --data PATH{suggested_data(cfg)}")
    if data is None or data == cfg.get("data"):
        data, root = run_data(run, cfg), root or cfg.get("data_root")
    out = Path(output) if output else default_analysis_dir(run, cfg["model"])
    check_folder(out, ("analysis",), "--output")
    check_not_inside(out, Path(data), f"--output {out}")
    val = build_classification_data(data, cfg["img_size"], train=False, root=root, download=download)
    class_map(cfg.get("classes"), val.classes, str(run))  # refuses data of other classes
    if split == "test" and val.test is None:
        raise ConfigError(f"{data} has no test split (fashion-mnist has one); analyze with --split val")
    dataset = val.test() if split == "test" else val.val
    # refused before the shares are measured over the whole split and before anything is written
    if not 0 <= image_index < len(dataset):
        raise ConfigError(f"--image-index {image_index} is outside the {split} split of {data}: pass one in "
                          f"0..{len(dataset) - 1}")
    claim(out, "analysis")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=val.collate)
    shares = unary_binary_shares(model, loader, max_batches=max_batches)
    write_json(out / "shares.json", shares)
    plot_shares({cfg["model"]: shares}, out / "shares.png")
    figures = [out / "shares.png"]
    image = dataset[image_index][0]
    maps = gate_maps(model, image)
    if maps:
        plot_gate_maps(image, maps, out / "gate_maps.png")
        figures.append(out / "gate_maps.png")
    if attention_layers_with_maps(model):
        name, weights, q = attention_map(model, image, layer, query)
        plot_attention_map(image, name, weights, q, out / "attention_map.png")
        figures.append(out / "attention_map.png")
    metrics = run / "metrics.csv" if run.is_dir() else None
    if metrics is not None and metrics.is_file():
        plot_curves({cfg["model"]: [read_metrics_csv(metrics)]}, out / "curves.png", CURVE_METRIC,
                    f"{cfg['model']} on {data}")
        figures.append(out / "curves.png")
    return dict(model=cfg["model"], shares=shares, figures=[str(f) for f in figures], output=str(out))


def default_analysis_dir(run: Path, model: Optional[str] = None) -> Path:
    """``RUN/analysis`` (a run directory, or the folder of a checkpoint file); for weights shipped inside the
    package, ``runs/analysis-<model>`` in the working directory: never the installed package."""
    try:
        folder = run if run.is_dir() else run.parent
    except OSError:  # a name the system cannot look up: the checkpoint reader names it
        folder = run.parent
    if folder.resolve() == Path(str(resources.files("lesa").joinpath(PRETRAINED_FOLDER))).resolve():
        return Path("runs") / f"analysis-{model or run.name.split('.')[0]}"
    return folder / "analysis"


def evaluate_without_unary(checkpoint: str | Path, data: Optional[str] = None, batch_size: int = 128,
                           device: str = "auto", workers: int = 0, quiet: bool = False,
                           model_name: Optional[str] = None, **source: Any) -> dict[str, Any]:
    """Table 1's ablation: a trained classifier evaluated with each query's own attention term removed
    (``source``: ``split``, ``root``, ``download`` of :func:`lesa.classification.evaluate_checkpoint`)."""
    return evaluate_checkpoint(checkpoint, data, batch_size, device, workers, quiet, model_name, within=ablate_unary,
                               **source)


def model_gmacs(model: torch.nn.Module, img_size: int) -> float:
    """Multiply-accumulates of one ``img_size`` image through ``model`` in eval mode, in billions (PyTorch's
    FlopCounterMode counts 2 FLOPs per MAC of its matmul / convolution / attention formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2e9


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of per-seed values."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _aggregate(row: dict[str, Any], runs: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """``row`` plus, for every key, the mean over ``runs`` (``key``) and their spread (``key_std``)."""
    for key in keys:
        row[key], row[f"{key}_std"] = _mean_std([run[key] for run in runs])
    row["n_seeds"] = len(runs)
    row["runs"] = runs
    return row


def _mean_shares(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer shares averaged over seeds (the same layers in every run)."""
    layers = [dict(layer, unary_pct=float(np.mean([r["layers"][i]["unary_pct"] for r in results])),
                   binary_pct=float(np.mean([r["layers"][i]["binary_pct"] for r in results])))
              for i, layer in enumerate(results[0]["layers"])]
    return dict(layers=layers, unary_pct=float(np.mean([r["unary_pct"] for r in results])),
                binary_pct=float(np.mean([r["binary_pct"] for r in results])))


def compare(arch: str = "resnet_tiny", data: str = "digits", output: str | Path = "runs/compare",
            ops: tuple[str, ...] = COMPARE_OPS, preset: Optional[str] = None, quiet: bool = False,
            seeds: Sequence[int] = (0,), **train_options: Any) -> list[dict[str, Any]]:
    """Train every operation's variant of ``arch`` once per seed, in ``OUTPUT/<op>/seed<k>`` (skipping
    finished runs, resuming interrupted ones), then measure and tabulate. Returns the rows written to
    ``compare.json``: per operation the mean over seeds of each metric (``val_top1``, ...), its sample
    standard deviation (``val_top1_std``, ``ddof=1``) and the per-seed values (``runs``)."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be one or more distinct integers (got {list(seeds)})")
    if "seed" in train_options:
        raise ConfigError("compare trains one run per seed: pass seeds=(...) instead of seed=")
    out = Path(output)
    claim(out, "compare")
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[list[dict[str, float]]]] = {}
    shares_by_op: dict[str, dict[str, Any]] = {}
    for op in ops:
        name = model_name(op, arch)
        runs, ablated_runs, shares_runs, histories = [], [], [], []
        for seed in seeds:
            run = out / op / f"seed{seed}"
            cfg = build_config(None, preset, model=name, data=data, output=str(run), quiet=quiet, seed=seed,
                               resume=(run / "last.pt").is_file(), **train_options)
            if (run / "last.pt").is_file():
                check_same_recipe(run, cfg)
            if not (run / "summary.json").is_file():
                train(cfg)
            summary = json.loads((run / "summary.json").read_text())
            model, cfg = load_trained_model(run / "last.pt")
            val = build_classification_data(data, cfg["img_size"], train=False, root=cfg.get("data_root"))
            shares = unary_binary_shares(model, DataLoader(val.val, batch_size=128, collate_fn=val.collate))
            shares_runs.append(shares)
            histories.append(read_metrics_csv(run / "metrics.csv"))
            runs.append(dict(seed=seed, run=str(run), params=summary["params"], val_top1=summary["val_top1"],
                             val_top5=summary["val_top5"], val_loss=summary["val_loss"],
                             unary_pct=shares["unary_pct"], binary_pct=shares["binary_pct"],
                             gmacs=model_gmacs(model, cfg["img_size"]),
                             wall_time_min=summary["wall_time_s"] / 60,
                             **{k: summary[k] for k in TEST_METRICS if k in summary}))
            if op == "sa":
                ablated = evaluate_without_unary(run / "last.pt", data, quiet=True)
                ablated_runs.append(dict(
                    seed=seed, run=str(run), val_top1=ablated["top1"], val_top5=ablated["top5"],
                    val_loss=ablated["loss"], unary_pct=0.0, binary_pct=shares["binary_pct"],
                    top1_err_increase=summary["val_top1"] - ablated["top1"],
                    loss_increase=ablated["loss"] - summary["val_loss"]))
        shares_by_op[OP_LABELS[op]] = _mean_shares(shares_runs)
        curves[OP_LABELS[op]] = histories
        tested = TEST_METRICS if all("test_top1" in r for r in runs) else ()
        rows.append(_aggregate(dict(operation=op, model=name, params=runs[0]["params"], gmacs=runs[0]["gmacs"]),
                               runs, SEED_METRICS + tested))
        if op in ("sa", "lesa"):
            analyze_run(out / op / f"seed{seeds[0]}", data, out / f"analysis_{op}")
        if op == "sa":
            rows.append(_aggregate(dict(operation="sa_minus_unary", model=name, params=runs[0]["params"]),
                                   ablated_runs, SEED_METRICS + ("top1_err_increase", "loss_increase")))
    write_json(out / "compare.json", dict(arch=arch, data=data, seeds=list(seeds),
                                          spread="sample standard deviation over seeds (ddof=1)", rows=rows))
    title = f"{arch} on {data}"
    table = format_tables(rows, title)
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(table))
    what = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    plot_curves(curves, out / "compare_curves.png", CURVE_METRIC, f"{title}: training and validation (Fig. 5), {what}")
    plot_shares(shares_by_op, out / "compare_shares.png")
    return rows


# options that say where and how a run is executed, not what it trains
RUN_CONTROL = ("output", "resume", "quiet", "workers", "device", "channels_last", "compile", "data_root", "download")


def check_same_recipe(run: Path, cfg: Any) -> None:
    """A comparison reuses (or resumes) a run of its folder only when it was trained with this recipe.

    Raises:
        ConfigError: the options that differ, with the fix.
    """
    state = load_checkpoint(run / "last.pt")
    saved, wanted = state.get("config", {}), cfg.to_dict()
    differ = [f"{key}={saved[key]!r} (this comparison: {wanted[key]!r})" for key in wanted
              if key not in RUN_CONTROL and key in saved and saved[key] != wanted[key]]
    identity = state.get("data_identity") or {}
    if not differ and identity.get("fingerprints") and Path(str(cfg.data)).is_dir():
        now = folder_fingerprints(str(cfg.data), tuple(identity["fingerprints"]))
        if now != identity["fingerprints"]:
            differ.append(f"data {cfg.data} (its files changed since the run)")
    if differ:
        raise ConfigError(f"{run} holds a run trained with other options: {'; '.join(differ[:4])}; a comparison "
                          "trains every run with one recipe: choose a new --output for these options, or pass the "
                          "ones of the runs there")


def _pm(row: dict[str, Any], key: str, digits: int, transform=None, signed: bool = False) -> str:
    """``mean ± std`` of a row's metric (just the value for a single seed or a row without spreads)."""
    value = row[key] if transform is None else transform(row[key])
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    std = row.get(f"{key}_std")
    if std is None or row.get("n_seeds", 1) < 2:
        return text
    return f"{text} ± {std:.{digits}f}"


def format_tables(rows: list[dict[str, Any]], title: str) -> str:
    """Markdown tables laid out like the paper's Tables 1, 2 and 6 (rows that exist only), with
    ``mean ± std`` over seeds where the rows come from several."""
    by_op = {r["operation"]: r for r in rows}
    lines = [f"# Comparison of operations: {title}", ""]
    n_seeds = max((r.get("n_seeds", 1) for r in rows), default=1)
    if n_seeds > 1:
        seeds = [run["seed"] for run in rows[0].get("runs", [])]
        lines += [f"Mean ± sample standard deviation over {n_seeds} seeds ({', '.join(map(str, seeds))}); "
                  "each seed is one training run per operation.", ""]

    def params(r):
        return f"{r['params'] / 1e6:.2f}"

    def err(v):
        return 100 - v

    if "sa" in by_op and "sa_minus_unary" in by_op:
        sa, ablated = by_op["sa"], by_op["sa_minus_unary"]
        lines += ["## Table 1: contribution of the unary term in SA", "",
                  "| Methods | Top-1 Err. (%) | Loss | Weight Pct. (%) |", "|---|---|---|---|"]
        lines.append(f"| SA | {_pm(sa, 'val_top1', 2, err)} | {_pm(sa, 'val_loss', 4)} | 100.00 |")
        lines.append(f"| SA - unary term | {_pm(ablated, 'val_top1', 2, err)} | {_pm(ablated, 'val_loss', 4)} | "
                     f"{_pm(ablated, 'binary_pct', 2)} |")
        lines.append("")
        if "top1_err_increase" in ablated:
            lines += [f"Removing the unary term changes SA's top-1 error by "
                      f"{_pm(ablated, 'top1_err_increase', 2, signed=True)} points and its loss by "
                      f"{_pm(ablated, 'loss_increase', 4, signed=True)} (differences within each seed's run).", ""]
    table2 = [op for op in ("conv", "sa", "lesa") if op in by_op]
    if table2:
        lines += ["## Table 2: accuracy and unary/binary weights", "",
                  "| Ops. | Params (M) | Top-1 (%) | Top-5 (%) | Loss | Unary (%) | Binary (%) |",
                  "|---|---|---|---|---|---|---|"]
        for op in table2:
            r = by_op[op]
            lines.append(f"| {OP_LABELS[op]} | {params(r)} | {_pm(r, 'val_top1', 2)} | {_pm(r, 'val_top5', 2)} | "
                         f"{_pm(r, 'val_loss', 4) if 'val_loss' in r else '-'} | {_pm(r, 'unary_pct', 1)} | "
                         f"{_pm(r, 'binary_pct', 1)} |")
        lines.append("")
    tested = [op for op in COMPARE_OPS if "test_top1" in by_op.get(op, {})]
    if tested:
        lines += ["## Test split (reported once per run, with best.pt chosen by validation top-1)", "",
                  "| Operations | Params (M) | GMACs | Test top-1 (%) | Test top-5 (%) | Wall time per run (min) |",
                  "|---|---|---|---|---|---|"]
        for op in tested:
            r = by_op[op]
            lines.append(f"| {OP_LABELS[op]} | {params(r)} | {r['gmacs']:.4f} | {_pm(r, 'test_top1', 2)} | "
                         f"{_pm(r, 'test_top5', 2)} | {_pm(r, 'wall_time_min', 1)} |")
        lines.append("")
    table6 = [op for op in COMPARE_OPS if op in by_op]
    lines += ["## Table 6: parallel connection methods and ablation", "",
              "| Operations | Params (M) | Top-1 (%) | Top-5 (%) | Loss |", "|---|---|---|---|---|"]
    for op in table6:
        r = by_op[op]
        lines.append(f"| {OP_LABELS[op]} | {params(r)} | {_pm(r, 'val_top1', 2)} | {_pm(r, 'val_top5', 2)} | "
                     f"{_pm(r, 'val_loss', 4) if 'val_loss' in r else '-'} |")
    return "\n".join(lines) + "\n"
