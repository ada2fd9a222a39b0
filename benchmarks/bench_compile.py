"""torch.compile (fullgraph, inductor) and export of a lesa model against eager PyTorch.

    python benchmarks/bench_compile.py                       # lesa_resnet50, 224x224, batch 2, all 8 cases
    python benchmarks/bench_compile.py --pos-embed rel2d --impl fused --mode train
    python benchmarks/bench_compile.py --export              # torch.export + ONNX (onnxruntime) instead

For each case: the first call's time (compilation included), the steady time of eager and compiled calls, and
the largest difference from eager PyTorch in float64, relative to the scale of what is compared, for the
compiled model and for eager float32 (train: one forward + backward from the same state; the output, all
gradients, all BatchNorm statistics). The models are seeded and their BatchNorms calibrated by two
training-mode passes, so that eval-mode outputs are data-like.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import lesa
from lesa.export import export_model


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def build(name: str, pos_embed: str, impl: str, size: int, batch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = lesa.create_model(name, pos_embed=pos_embed, impl=impl, img_size=size)
    model.train()
    with torch.no_grad():
        for seed in (1, 2):
            model(torch.randn(max(batch, 2), 3, size, size, generator=torch.Generator().manual_seed(seed)))
    return model


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """Seconds of the first call and the best of ``repeats`` further calls."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def train_step(model: torch.nn.Module, fn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward + backward; returns the output, all gradients and all floating-point buffers (flattened)."""
    model.zero_grad(set_to_none=True)
    out = fn(x)
    out.logsumexp(1).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    buffers = torch.cat([b.flatten() for b in model.buffers() if b.is_floating_point()])
    return out.detach(), grads, buffers


def bench_compile(args: argparse.Namespace, pos_embed: str, impl: str, mode: str) -> str:
    """Errors are measured against eager PyTorch in float64, for the compiled model and for eager float32
    alike: float32 rounding, amplified by a deep network at initialisation, is the yardstick."""
    model = build(args.model, pos_embed, impl, args.size, args.batch)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(3))
    model64, x64 = copy.deepcopy(model).double(), x.double()
    torch._dynamo.reset()
    if mode == "eval":
        model.eval(), model64.eval()
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            first, best = timed(lambda: compiled(x))
            _, eager = timed(lambda: model(x), repeats=1)
            expected = model64(x64)
            errors = [rel_error(compiled(x).double(), expected), rel_error(model(x).double(), expected)]
        return (f"| {pos_embed} | {impl} | eval | {first:.0f} | {eager:.2f} | {best:.2f} | "
                f"{errors[0]:.1e} / {errors[1]:.1e} | | |")
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    ours = train_step(model, compiled, x)  # one training step each from the same state
    first = time.perf_counter() - start
    theirs = train_step(eager_model, eager_model, x)
    expected = train_step(model64, model64, x64)
    cells = [f"{rel_error(a.double(), e):.1e} / {rel_error(b.double(), e):.1e}"
             for a, b, e in zip(ours, theirs, expected)]
    _, best = timed(lambda: train_step(model, compiled, x), repeats=2)
    _, eager = timed(lambda: train_step(eager_model, eager_model, x), repeats=1)
    return f"| {pos_embed} | {impl} | train | {first:.0f} | {eager:.2f} | {best:.2f} | {' | '.join(cells)} |"


def bench_export(args: argparse.Namespace, pos_embed: str, impl: str) -> str:
    model = build(args.model, pos_embed, impl, args.size, args.batch).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".pt2", ".onnx"):
            start = time.perf_counter()
            result = export_model(model, Path(tmp) / f"model{suffix}")
            seconds = time.perf_counter() - start
            rows.append(f"| {pos_embed} | {impl} | {result['format']} | {seconds:.0f} | {result['checked_with']} "
                        f"| {result['max_rel_error']:.1e} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lesa_resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos-embed", nargs="+", default=["flat", "rel2d"])
    parser.add_argument("--impl", nargs="+", default=["reference", "fused"])
    parser.add_argument("--mode", nargs="+", default=["eval", "train"])
    parser.add_argument("--export", action="store_true", help="torch.export and ONNX instead of torch.compile")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model}, {args.size}x{args.size}, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.export:
        print("| pos_embed | impl | format | export + check (s) | run by | max error / scale |\n"
              "|---|---|---|---|---|---|")
    else:
        print("| pos_embed | impl | mode | first call (s) | eager (s) | compiled (s) | output error: compiled / "
              "eager float32 | gradients | BN statistics |\n|---|---|---|---|---|---|---|---|---|")
    for pos_embed in args.pos_embed:
        for impl in args.impl:
            if args.export:
                print(bench_export(args, pos_embed, impl), flush=True)
                continue
            for mode in args.mode:
                print(bench_compile(args, pos_embed, impl, mode), flush=True)


if __name__ == "__main__":
    main()
