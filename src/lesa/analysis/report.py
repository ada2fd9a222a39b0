"""``lesa analyze RUN_DIR`` and ``lesa compare``: the paper's analyses of trained runs.

``analyze_run`` measures a run's unary/binary shares on its validation set and draws the per-layer
shares, the fusion gate of one image and one query's attention. ``compare`` trains the conv, SA, AA,
static-LESA and LESA variants of an architecture with one recipe and seed, evaluates SA without its unary
term, and lays the results out as the paper's Tables 1, 2 and 6 (``compare.json``, ``compare.md``) with
the training curves of all runs in one figure (Fig. 5).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import DataLoader

from ..data import build_classification_data
from ..engine import build_config, evaluate_checkpoint, load_trained_model, train
from ..engine.records import plot_curves, read_metrics_csv, write_json
from ..models.registry import model_name
from ..utils import atomic_write
from .figures import plot_attention_map, plot_gate_maps, plot_shares
from .maps import attention_layers_with_maps, attention_map, gate_maps
from .shares import unary_binary_shares

COMPARE_OPS = ("conv", "sa", "aa", "static_lesa", "lesa")
OP_LABELS = {"conv": "Convolution", "sa": "Self-Attention", "aa": "AA", "static_lesa": "Static LESA",
             "lesa": "LESA", "sa_minus_unary": "SA - unary term"}


def analyze_run(run: str | Path, data: Optional[str] = None, output: Optional[str | Path] = None,
                layer: Optional[str] = None, query: Optional[tuple[int, int]] = None, image_index: int = 0,
                max_batches: Optional[int] = None, batch_size: int = 128) -> dict[str, Any]:
    """Shares (``shares.json``) and figures (``shares.png``, ``gate_maps.png``, ``attention_map.png``,
    ``curves.png``) of a trained run, in ``output`` (default ``RUN/analysis``)."""
    run = Path(run)
    model, cfg = load_trained_model(run)
    data = data or cfg.get("data")
    if not data:
        raise ValueError("no data: pass --data PATH or --data digits")
    out = Path(output) if output else (run if run.is_dir() else run.parent) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    val = build_classification_data(data, cfg["img_size"], train=False)
    dataset = val.val
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=val.collate)
    shares = unary_binary_shares(model, loader, max_batches=max_batches)
    write_json(out / "shares.json", shares)
    plot_shares({cfg["model"]: shares}, out / "shares.png")
    figures = [out / "shares.png"]
    if not 0 <= image_index < len(dataset):
        raise ValueError(f"image index {image_index} is outside the validation set (0..{len(dataset) - 1})")
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
        plot_curves({cfg["model"]: read_metrics_csv(metrics)}, out / "curves.png", f"{cfg['model']} on {data}")
        figures.append(out / "curves.png")
    return dict(model=cfg["model"], shares=shares, figures=[str(f) for f in figures], output=str(out))


def compare(arch: str = "resnet_tiny", data: str = "digits", output: str | Path = "runs/compare",
            ops: tuple[str, ...] = COMPARE_OPS, preset: Optional[str] = None, quiet: bool = False,
            **train_options: Any) -> list[dict[str, Any]]:
    """Train every operation's variant of ``arch`` (skipping finished runs, resuming interrupted ones),
    then measure and tabulate. Returns the rows written to ``compare.json``."""
    out = Path(output)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, float]]] = {}
    shares_by_op: dict[str, dict[str, Any]] = {}
    for op in ops:
        name = model_name(op, arch)
        run = out / op
        if not (run / "summary.json").is_file():
            cfg = build_config(None, preset, model=name, data=data, output=str(run), quiet=quiet,
                               resume=(run / "last.pt").is_file(), **train_options)
            train(cfg)
        summary = json.loads((run / "summary.json").read_text())
        model, cfg = load_trained_model(run / "last.pt")
        val = build_classification_data(data, cfg["img_size"], train=False)
        shares = unary_binary_shares(model, DataLoader(val.val, batch_size=128, collate_fn=val.collate))
        shares_by_op[OP_LABELS[op]] = shares
        curves[OP_LABELS[op]] = read_metrics_csv(run / "metrics.csv")
        rows.append(dict(operation=op, model=name, params=summary["params"], val_top1=summary["val_top1"],
                         val_top5=summary["val_top5"], unary_pct=shares["unary_pct"], binary_pct=shares["binary_pct"]))
        if op in ("sa", "lesa"):
            analyze_run(run, data, out / f"analysis_{op}")
        if op == "sa":
            ablated = evaluate_checkpoint(run / "last.pt", data, quiet=True, ablate_unary=True)
            rows.append(dict(operation="sa_minus_unary", model=name, params=summary["params"],
                             val_top1=ablated["top1"], val_top5=ablated["top5"], unary_pct=0.0,
                             binary_pct=shares["binary_pct"]))
    write_json(out / "compare.json", {"rows": rows})
    table = format_tables(rows, f"{arch} on {data}")
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(table))
    plot_curves(curves, out / "compare_curves.png", f"{arch} on {data}: training and validation (Fig. 5)")
    plot_shares(shares_by_op, out / "compare_shares.png")
    return rows


def format_tables(rows: list[dict[str, Any]], title: str) -> str:
    """Markdown tables laid out like the paper's Tables 1, 2 and 6 (rows that exist only)."""
    by_op = {r["operation"]: r for r in rows}
    lines = [f"# Comparison of operations: {title}", ""]

    def params(r):
        return f"{r['params'] / 1e6:.2f}"

    if "sa" in by_op and "sa_minus_unary" in by_op:
        lines += ["## Table 1: contribution of the unary term in SA", "",
                  "| Methods | Top-1 Err. (%) | Weight Pct. (%) |", "|---|---|---|"]
        lines.append(f"| SA | {100 - by_op['sa']['val_top1']:.2f} | 100.00 |")
        ablated = by_op["sa_minus_unary"]
        lines.append(f"| SA - unary term | {100 - ablated['val_top1']:.2f} | {ablated['binary_pct']:.2f} |")
        lines.append("")
    table2 = [op for op in ("conv", "sa", "lesa") if op in by_op]
    if table2:
        lines += ["## Table 2: accuracy and unary/binary weights", "",
                  "| Ops. | Params (M) | Top-1 (%) | Top-5 (%) | Unary (%) | Binary (%) |", "|---|---|---|---|---|---|"]
        for op in table2:
            r = by_op[op]
            lines.append(f"| {OP_LABELS[op]} | {params(r)} | {r['val_top1']:.2f} | {r['val_top5']:.2f} | "
                         f"{r['unary_pct']:.1f} | {r['binary_pct']:.1f} |")
        lines.append("")
    table6 = [op for op in COMPARE_OPS if op in by_op]
    lines += ["## Table 6: parallel connection methods and ablation", "",
              "| Operations | Params (M) | Top-1 (%) | Top-5 (%) |", "|---|---|---|---|"]
    for op in table6:
        r = by_op[op]
        lines.append(f"| {OP_LABELS[op]} | {params(r)} | {r['val_top1']:.2f} | {r['val_top5']:.2f} |")
    return "\n".join(lines) + "\n"
