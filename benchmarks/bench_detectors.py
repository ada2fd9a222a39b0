"""Seconds per training step of Mask R-CNN, Cascade Mask R-CNN and HTC (with and without the semantic
branch) over the same lesa backbone, on digit scenes.

Each configuration runs in its own process; the configurations are interleaved over ``--repeats`` rounds
and the median is reported. A measurement is ``--steps`` timed training steps (forward, backward, SGD
step) after ``--warmup`` untimed ones, on the embedded digit scenes at the given sizes.

    python benchmarks/bench_detectors.py --threads 2 --out docs/benchmarks/detectors_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "maskrcnn": dict(kind="maskrcnn", semantic=False),
    "cascade_maskrcnn": dict(kind="cascade_maskrcnn", semantic=False),
    "htc (no semantic)": dict(kind="htc", semantic=False),
    "htc": dict(kind="htc", semantic=True),
}


def measure(name: str, args: argparse.Namespace) -> float:
    import torch

    from lesa.data.coco import CocoDetection, collate_detection
    from lesa.data.digit_scenes import ensure_digit_scenes
    from lesa.detection import build_detector

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    root = ensure_digit_scenes()
    data = CocoDetection(root / "train.json", root / "train", train=True,
                         semantic="instances" if cfg["semantic"] else None)
    model = build_detector(cfg["kind"], args.backbone, len(data.classes) + 1, min_size=args.min_size,
                           max_size=args.max_size, semantic_classes=len(data.classes) + 1 if cfg["semantic"] else None,
                           box_batch_size_per_image=128, rpn_post_nms_top_n_train=1000)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
    model.train()
    times = []
    for step in range(args.warmup + args.steps):
        images, targets = collate_detection([data[(step * args.batch + i) % len(data)] for i in range(args.batch)])
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="lesa_resnet_tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("out", "child")]
    for _ in range(args.repeats):
        for name in CONFIGS:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", name], check=True,
                                 capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    table = {name: dict(s_per_step=statistics.median(v), runs=v) for name, v in results.items()}
    for name, row in table.items():
        print(f"{name:20s} {row['s_per_step']:.2f} s/step (runs: {', '.join(f'{x:.2f}' for x in row['runs'])})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(config=vars(args), results=table), f, indent=2)


if __name__ == "__main__":
    main()
