"""Seconds per training step of Mask R-CNN, Cascade Mask R-CNN and HTC (with and without the semantic
branch) over the same lesa backbone, on digit scenes, and each one's ratio to Mask R-CNN.

Each configuration runs in its own process; the configurations are interleaved over ``--repeats`` rounds
and the median is reported. A measurement is ``--steps`` timed training steps (forward, backward, SGD
step) after ``--warmup`` untimed ones, on the embedded digit scenes at the given sizes. ``--src LABEL=DIR``
(repeated) measures the package of several checkouts (``DIR`` is a checkout's ``src``), each configuration
under every source in turn; ``--profile CONFIG`` prints where one step of a configuration goes instead.

    python benchmarks/bench_detectors.py --threads 2 --out docs/benchmarks/detectors_cpu.json
    git worktree add /tmp/before COMMIT    # before / after a change, interleaved:
    python benchmarks/bench_detectors.py --src before=/tmp/before/src --src after=src
    python benchmarks/bench_detectors.py --profile htc
"""
from __future__ import annotations

import argparse
import json
import os
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


def measure(name: str, args: argparse.Namespace, profile: bool = False) -> float:
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
    if args.saturate:
        saturate_positives(model)

    def step(index: int) -> float:
        images, targets = collate_detection([data[(index * args.batch + i) % len(data)] for i in range(args.batch)])
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for index in range(args.warmup):
        step(index)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            seconds = step(args.warmup)
        events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{name}: one step {seconds:.2f} s ({total / 1e6:.2f} s of operations); by self time:")
        for e in events[:30]:
            print(f"{e.self_cpu_time_total / 1e6:7.3f} s {100 * e.self_cpu_time_total / total:5.1f} % {e.count:4d}x "
                  f"{e.key[:40]:40s} {str(e.input_shapes)[:90]}")
        return seconds
    return statistics.median(step(args.warmup + i) for i in range(args.steps))


def saturate_positives(model) -> None:
    """Add 64 copies of every ground-truth box, each side moved by up to 5 % of the box's size, to the RPN's
    proposals: every stage then samples its full share of positive RoIs (25 %), as late in training, where a
    fresh model's proposals match few objects. The mask heads run on every positive RoI."""
    import torch

    rpn_forward = model.rpn.forward
    generator = torch.Generator().manual_seed(0)

    def forward(images, features, targets=None):
        proposals, losses = rpn_forward(images, features, targets)
        if targets is None:
            return proposals, losses
        out = []
        for boxes, target in zip(proposals, targets):
            gt = target["boxes"].repeat(64, 1)
            size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
            out.append(torch.cat([boxes, gt + (torch.rand(gt.shape, generator=generator) - 0.5) * 0.1 * size]))
        return out, losses

    model.rpn.forward = forward


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
    parser.add_argument("--src", action="append", default=[], metavar="LABEL=DIR",
                        help="measure the lesa package under DIR (a checkout's src) as LABEL; repeat to compare")
    parser.add_argument("--profile", choices=list(CONFIGS), help="profile one step of this configuration")
    parser.add_argument("--saturate", action="store_true",
                        help="every stage samples its full share of positive RoIs (as late in training)")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.profile:
        print(json.dumps(measure(args.child or args.profile, args, profile=bool(args.profile))))
        return
    sources = [tuple(s.split("=", 1)) for s in args.src] or [("installed", None)]
    if any(len(s) != 2 for s in sources):
        parser.error("--src takes LABEL=DIR")
    results: dict[str, dict[str, list[float]]] = {label: {name: [] for name in CONFIGS} for label, _ in sources}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("out", "child", "src", "profile", "saturate")]
    passthrough += ["--saturate"] if args.saturate else []
    for _ in range(args.repeats):
        for name in CONFIGS:
            for label, src in sources:
                env = dict(os.environ)
                if src:
                    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), *filter(None, [env.get("PYTHONPATH")])])
                out = subprocess.run([sys.executable, __file__, *passthrough, "--child", name], check=True,
                                     capture_output=True, text=True, env=env).stdout
                results[label][name].append(json.loads(out.strip().splitlines()[-1]))
    tables = {}
    for label, _ in sources:
        table = {name: dict(s_per_step=statistics.median(v), runs=v) for name, v in results[label].items()}
        for row in table.values():
            row["vs_maskrcnn"] = row["s_per_step"] / table["maskrcnn"]["s_per_step"]
        tables[label] = table
        for name, row in table.items():
            runs = ", ".join(f"{x:.2f}" for x in row["runs"])
            print(f"{label + ' ' if len(sources) > 1 else ''}{name:20s} {row['s_per_step']:.2f} s/step  "
                  f"{row['vs_maskrcnn']:.2f}x Mask R-CNN  (runs: {runs})")
    if args.out:
        report = dict(config=vars(args), results=tables[sources[-1][0]])
        if len(sources) > 1:
            report["sources"] = {label: dict(src=src, results=tables[label]) for label, src in sources}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
