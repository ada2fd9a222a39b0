"""Mask R-CNN vs Cascade Mask R-CNN vs HTC (with and without the semantic branch) on the digit scenes:
the same LESA backbone, data, schedule and seed for each; box / mask AP from each run's ``coco_eval.json``,
seconds per training step from ``benchmarks/bench_detectors.py`` (quiet machine, own process per
detector), and a figure of each detector's predictions on the same validation scenes.

    python benchmarks/compare_detectors.py --train --runs runs/det-compare   # trains the four (CPU: ~1-2 h)
    python benchmarks/bench_detectors.py --min-size 256 --max-size 320 --out docs/benchmarks/detectors_cpu.json
    python benchmarks/compare_detectors.py --runs runs/det-compare --speed docs/benchmarks/detectors_cpu.json

Training settings (``--train``): ``lesa det train --detector D --epochs 2 --min-size 256 --max-size 320
--seed 0`` on the embedded digit scenes, evaluated on all 80 validation scenes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DETECTORS = {  # run name: (label, detector options)
    "maskrcnn": ("Mask R-CNN", ["--detector", "maskrcnn"]),
    "cascade_maskrcnn": ("Cascade Mask R-CNN", ["--detector", "cascade_maskrcnn"]),
    "htc-nosem": ("HTC without semantic", ["--detector", "htc", "--no-semantic"]),
    "htc": ("HTC", ["--detector", "htc"]),
}
SPEED_NAMES = {"maskrcnn": "maskrcnn", "cascade_maskrcnn": "cascade_maskrcnn", "htc-nosem": "htc (no semantic)",
               "htc": "htc"}
TRAIN = ["--epochs", "2", "--min-size", "256", "--max-size", "320", "--max-eval-images", "80", "--seed", "0",
         "--quiet"]


def train(runs: Path) -> None:
    for name, (_, options) in DETECTORS.items():
        if (runs / name / "summary.json").exists():
            continue
        subprocess.run([sys.executable, "-m", "lesa", "det", "train", *options, *TRAIN, "--output", str(runs / name)],
                       check=True)


def table(runs: Path, speed: dict) -> str:
    lines = ["| detector | params | s / step | box AP | AP50 | AP75 | APs | APm | mask AP | AP50 | AP75 | APs | APm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (label, _) in DETECTORS.items():
        run = runs / name
        if not (run / "coco_eval.json").exists():
            lines.append(f"| {label} | not finished |" + " |" * 11)
            continue
        result = json.loads((run / "coco_eval.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        step = speed.get(SPEED_NAMES[name], {}).get("s_per_step")
        cells = [label, f"{summary['params'] / 1e6:.1f}M" if "params" in summary else "-",
                 f"{step:.2f}" if step else "-"]
        for kind in ("bbox", "segm"):
            stats = result[kind]
            cells += ["-" if stats.get(k) is None else f"{stats[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(runs: Path, out: Path, scenes: int, score_threshold: float) -> None:
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lesa.data.digit_scenes import ensure_digit_scenes
    from lesa.detection.predict import predict_images

    root = ensure_digit_scenes()
    images = json.loads((root / "val.json").read_text())["images"][:scenes]
    paths = [str(root / "val" / im["file_name"]) for im in images]
    names = [n for n in DETECTORS if (runs / n / "best.pt").exists()]
    fig, axes = plt.subplots(len(names), scenes, figsize=(2.6 * scenes, 2.7 * len(names)), squeeze=False)
    with tempfile.TemporaryDirectory() as tmp:
        for row, name in enumerate(names):
            drawn = list(predict_images(runs / name / "best.pt", paths, Path(tmp) / name, score_threshold, "cpu"))
            for col, (_, _, png) in enumerate(drawn):
                ax = axes[row][col]
                ax.imshow(plt.imread(png))
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(DETECTORS[name][0], fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "det-compare")
    ap.add_argument("--train", action="store_true", help="train the detectors whose runs are missing")
    ap.add_argument("--speed", type=Path, help="bench_detectors.py's JSON")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "detector_compare.png")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--score-threshold", type=float, default=0.2)
    args = ap.parse_args()
    if args.train:
        train(args.runs)
    speed = json.loads(args.speed.read_text())["results"] if args.speed else {}
    print(table(args.runs, speed))
    if not args.no_figure:
        figure(args.runs, args.figure, args.scenes, args.score_threshold)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
