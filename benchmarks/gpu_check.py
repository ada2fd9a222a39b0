"""One script for the day a GPU is lent: correctness, layer and model speed, and launch counts, written as
JSON + Markdown into one results folder (docs/performance.md's GPU section is made from it).

    python benchmarks/gpu_check.py --out results/h200                # on a CUDA machine, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gc   # the same code path on a CPU (a test runs it)
    python benchmarks/gpu_check.py --device cpu --sections launches --out /tmp/gc   # launch counts, any machine

Sections:

1. **correctness**: the fused binary term against the reference path, both embeddings, eval and train, in
   each low precision the device has (float32, bfloat16, float16 on CUDA): the error of each path's output
   and input gradient relative to the float64 reference, side by side (the fused path must not be worse
   than the reference path in the same precision by more than a small factor).
2. **layer**: ``LESA2d(256, 256, heads=8, 'rel2d')`` forward + backward at 64², 128², 256² (quick: 14², 24²),
   reference and fused: time and peak memory (``measure.py``); a reference that would not fit is recorded
   as refused.
3. **model**: lesa_resnet50 training throughput at 224² (batch 64 and 128, bfloat16 autocast,
   channels-last, eager and ``torch.compile``) beside torchvision's resnet50 (quick: the tiny models at 32²,
   batch 8, eager).
4. **launches**: the ATen operations one ``BinaryAttention2d`` forward + backward dispatches
   (:data:`LAUNCH_CASES`, training and eval, batch 8, 64, 256; quick: 2, 8) under each block policy
   (``LESA_BLOCK_POLICY``, :func:`lesa.layers.rel2d_attention.block_sizes`): each is a kernel launch on a GPU,
   so under the CUDA policy this count must not grow with the batch. On CUDA counted on the device; on the
   CPU over fake tensors (shapes only: the same operations at no cost, at any batch).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402

# (pos_embed, map side, heads) of the launch counts: 'flat' at the paper's classification size and at 32x32,
# 'rel2d' at 32x32. 'flat' 32x32 with 2 heads: 8 heads' whole (N, 8, 1024, 1024) logits exceed the CUDA
# policy's nominal budget from batch 114 on, where its blocks (and launches) multiply again.
LAUNCH_CASES = (("flat", 14, 8), ("flat", 32, 2), ("rel2d", 32, 8))


class CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched inside it (views included: each is a launch-sized cost on the
    host; not the fake-tensor mode's own ``prim`` queries)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace == "aten"
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def block_policy(policy: str):
    """``LESA_BLOCK_POLICY=policy`` within the block."""
    from lesa.layers.rel2d_attention import POLICY_VARIABLE

    previous = os.environ.get(POLICY_VARIABLE)
    os.environ[POLICY_VARIABLE] = policy
    try:
        yield
    finally:
        if previous is None:
            del os.environ[POLICY_VARIABLE]
        else:
            os.environ[POLICY_VARIABLE] = previous


def layer_ops(pos_embed: str, size: int, heads: int, batch: int, training: bool, channels: int = 256,
              device: str = "cpu") -> int:
    """ATen operations of one ``BinaryAttention2d(channels, channels, heads, pos_embed, size)`` forward +
    backward (``impl='auto'``) on a ``batch x channels x size x size`` input: on the CPU over fake tensors,
    elsewhere on the device."""
    from lesa.layers.binary import BinaryAttention2d

    with FakeTensorMode() if device == "cpu" else contextlib.nullcontext():
        layer = BinaryAttention2d(channels, channels, heads, pos_embed, size, "auto").train(training)
        layer = layer if device == "cpu" else layer.to(device)
        x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
        with CountOps() as counter:
            layer(x).square().sum().backward()
    return counter.count


def precisions(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.startswith("cuda") else [])


def relative_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth).norm() / truth.norm().clamp_min(1e-30))


def correctness(device: str, quick: bool) -> list[dict]:
    """Output and input-gradient error of the reference and fused paths against float64: LESA2d with 4
    heads, both embeddings, and (not quick) 'rel2d' with one head of width 236 at 24x24, whose
    ``d + H + W = 284`` exceeds flash attention's 256: the key split on CUDA
    (:func:`lesa.layers.rel2d_attention.block_sizes`)."""
    from lesa import LESA2d

    size, channels, rows = (12, 16, []) if quick else (20, 64, [])
    cases = [("flat", size, channels, 4), ("rel2d", size, channels, 4)] + ([] if quick else [("rel2d", 24, 472, 1)])
    for pos_embed, size, out_channels, heads in cases:
        for training in (False, True):
            torch.manual_seed(0)
            layers = {impl: LESA2d(channels, out_channels, heads=heads, pos_embed=pos_embed, feature_size=size,
                                   impl=impl) for impl in ("reference", "fused")}
            layers["fused"].load_state_dict(layers["reference"].state_dict())
            x = torch.randn(2, channels, size, size)
            truth_out, truth_grad = _run(layers["reference"], x, torch.float64, device, training)
            for dtype in precisions(device):
                row = dict(pos_embed=pos_embed, size=size, head_width=out_channels // heads // 2,
                           mode="train" if training else "eval", dtype=str(dtype)[6:])
                for impl, layer in layers.items():
                    out, grad = _run(layer, x, dtype, device, training)
                    row[f"{impl}_out_err"] = relative_error(out, truth_out)
                    row[f"{impl}_grad_err"] = relative_error(grad, truth_grad)
                rows.append(row)
    return rows


def _run(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, device: str,
         training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    layer = layer.to(device, torch.float64 if dtype == torch.float64 else torch.float32).train(training)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    inp = x.to(device, layer.binary.qkv.weight.dtype).clone().requires_grad_()  # never x itself: grads add up
    low = dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=low):
        out = layer(inp)
    out.float().square().sum().backward()
    layer.load_state_dict(state)  # training updated the BatchNorm statistics
    return out.detach().cpu(), inp.grad.detach().cpu()


def layer_speed(device: str, quick: bool) -> list[dict]:
    from lesa import LESA2d
    from lesa.errors import LesaError

    sizes, channels, batch = ([14, 24], 32, 2) if quick else ([64, 128, 256], 256, 2)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows = []
    for size in sizes:
        for impl in ("reference", "fused"):
            row = dict(size=size, impl=impl, dtype=str(dtype)[6:], batch=batch)
            try:
                layer = LESA2d(channels, channels, heads=8, pos_embed="rel2d", feature_size=size, impl=impl)
                layer = layer.to(device, dtype).train()
                x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
                result = measure(lambda layer=layer, x=x: layer(x).float().square().mean().backward(), device,
                                 warmup=1, iters=2 if quick else 5)
            except LesaError as err:  # the reference path refuses what cannot be allocated
                result = dict(status="refused", error=str(err)[:120])
            row.update(status=result["status"])
            if result["status"] == "ok":
                row.update(time_s=min(result["times"]), peak_mib=result["peak_mib"])
            rows.append(row)
    return rows


def model_speed(device: str, quick: bool, compile_models: bool) -> list[dict]:
    import torchvision

    from lesa import create_model

    if quick:
        models = {"lesa_resnet_tiny": lambda: create_model("lesa_resnet_tiny"),
                  "resnet_tiny": lambda: create_model("resnet_tiny")}
        size, batches = 32, [8]
    else:
        models = {"lesa_resnet50": lambda: create_model("lesa_resnet50"),
                  "torchvision resnet50": lambda: torchvision.models.resnet50()}
        size, batches = 224, [64, 128]
    cuda = device.startswith("cuda")
    rows = []
    for name, build in models.items():
        for batch in batches:
            for compiled in (False, True) if compile_models else (False,):
                model = build().to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
                net = torch.compile(model) if compiled else model
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                x = torch.randn(batch, 3, size, size, device=device)
                y = torch.randint(0, 10, (batch,), device=device)

                def step(net=net, optimizer=optimizer, x=x, y=y):
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
                    loss.backward()
                    optimizer.step()

                result = measure(step, device, warmup=2 if compiled else 1, iters=2 if quick else 10)
                row = dict(model=name, batch=batch, compiled=compiled, status=result["status"])
                if result["status"] == "ok":
                    row.update(images_per_s=batch / min(result["times"]), peak_mib=result["peak_mib"])
                rows.append(row)
    return rows


def launches(device: str, quick: bool) -> list[dict]:
    """:func:`layer_ops` of :data:`LAUNCH_CASES` under each block policy, training and eval."""
    from lesa.layers.rel2d_attention import BLOCK_POLICIES

    channels, batches = (32, [2, 8]) if quick else (256, [8, 64, 256])
    rows = []
    for policy in BLOCK_POLICIES:
        for pos_embed, size, heads in LAUNCH_CASES:
            for training in (True, False):
                for batch in batches:
                    with block_policy(policy):
                        ops = layer_ops(pos_embed, size, heads, batch, training, channels, device)
                    rows.append(dict(policy=policy, pos_embed=pos_embed, size=size, heads=heads,
                                     mode="train" if training else "eval", batch=batch, aten_ops=ops))
    return rows


def markdown(results: dict) -> str:
    lines = [f"# gpu_check on {results['device_name']} ({results['torch']}, {results['when']})", ""]
    for section, rows in results["sections"].items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


SECTIONS = ("correctness", "layer", "model", "launches")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script end to end")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the models (default on CUDA)")
    parser.add_argument("--out", required=True, help="results folder (results.json, results.md)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these (default: all)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device; use --device cpu")
    sections: dict[str, Callable[[], list]] = {
        "correctness": lambda: correctness(args.device, args.quick),
        "layer": lambda: layer_speed(args.device, args.quick),
        "model": lambda: model_speed(args.device, args.quick, args.compile or args.device.startswith("cuda")),
        "launches": lambda: launches(args.device, args.quick),
    }
    results = dict(device=args.device, torch=torch.__version__, python=platform.python_version(),
                   when=time.strftime("%Y-%m-%d %H:%M"), quick=args.quick, sections={},
                   device_name=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else platform.processor() or "cpu")
    for name in args.sections:
        run, started = sections[name], time.time()
        results["sections"][name] = run()
        print(f"{name}: {len(results['sections'][name])} rows in {time.time() - started:.1f}s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
