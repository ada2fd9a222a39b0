"""Benchmark one LESA layer: reference vs fused binary term, forward + backward time and peak memory.

Every configuration runs in a fresh process, so peak memory is that configuration's alone (how it is
measured: ``measure.py``). A configuration that would need more than ``--max-gb`` is reported as out of
memory.

    python benchmarks/bench_layer.py                                  # CPU, 2 threads, C=256, 8 heads
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --batch 8 --sizes 14 32 64 96 128
    python benchmarks/bench_layer.py --official-root PATH/TO/LESA_classification   # also the authors' code
    python benchmarks/bench_layer.py --impls fused --out /tmp/fused          # re-check the fused rows only

Writes ``<out>/layer_<device>.json``, ``.md`` (table) and ``.png`` (peak memory vs H*W).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from measure import cap_memory, measure


def worker(args: argparse.Namespace) -> dict:
    if args.device == "cpu":
        cap_memory(args.max_gb)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    size = args.size
    if args.impl == "official":
        layer = official_layer(args, size)
    else:
        from lesa import LESA2d

        layer = LESA2d(args.channels, args.channels, heads=args.heads, pos_embed=args.embed,
                       feature_size=size, impl=args.impl)
    layer = layer.to(args.device, dtype).train()
    x = torch.randn(args.batch, args.channels, size, size, device=args.device, dtype=dtype, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).float().square().mean().backward()

    result = measure(step, args.device, warmup=1, iters=args.repeat)  # the warm-up step sets the peak too
    if result["status"] != "ok":
        return result
    return dict(status="ok", time_s=min(result["times"]), peak_mib=result["peak_mib"])  # the least disturbed


def official_layer(args, size):
    """The authors' LESA module (from a checkout outside this repository)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import official_parity as op

    resnet = op.import_official(Path(args.official_root))
    cfg = op.official_config(False, "classification" if args.embed == "flat" else "detection_qr").lesa
    return resnet.lesa3x3(lesa=cfg, in_planes=args.channels, out_planes=args.channels, kernel_size=size)


def run_all(args: argparse.Namespace) -> list[dict]:
    impls = [i for i in args.impls if i != "official" or args.official_root]
    rows = []
    for embed in args.embeds:
        for size in args.sizes:
            for impl in impls:
                cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--impl", impl, "--embed", embed]
                for key in ("channels", "heads", "batch", "threads", "device", "dtype", "repeat", "max_gb"):
                    cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                if args.official_root:
                    cmd += ["--official-root", args.official_root]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode == 0:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                else:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    result = dict(status=f"failed (exit {proc.returncode})", error=tail[:200])
                row = dict(embed=embed, size=size, hw=size * size, impl=impl, **result)
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['embed']:5s} {r['size']:4d}^2 {r['impl']:9s} {r['status']}"
    return f"{r['embed']:5s} {r['size']:4d}^2 {r['impl']:9s} {r['time_s'] * 1e3:10.1f} ms {r['peak_mib']:10.1f} MiB"


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"layer_{args.device}"
    env = describe_env(args)
    (out / f"{stem}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    lines = [
        f"LESA2d({args.channels}, {args.channels}, heads={args.heads}), batch {args.batch}, {args.dtype}, "
        f"training mode, forward + backward; {env}",
        "",
        "| embedding | map | H*W | impl | time (ms) | peak memory (MiB) | speed-up | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {(r["embed"], r["size"]): r for r in rows if r["impl"] == "reference" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            cells = [r["status"], "", "", ""]
        else:
            base = ref.get((r["embed"], r["size"]))
            ratios = ["", ""]
            if base and r["impl"] != "reference":
                ratios = [f"{base['time_s'] / r['time_s']:.2f}x", f"{r['peak_mib'] / base['peak_mib']:.3f}"]
            cells = [f"{r['time_s'] * 1e3:.1f}", f"{r['peak_mib']:.1f}", *ratios]
        head = f"| {r['embed']} | {r['size']}x{r['size']} | {r['hw']} | {r['impl']} | "
        lines.append(head + " | ".join(cells) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / f"{stem}.png", lines[0])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["o-", "s--", "^-", "v--", "d-", "x--"]
    for (embed, impl), style in zip(sorted({(r["embed"], r["impl"]) for r in rows}), styles):
        pts = [r for r in rows if r["embed"] == embed and r["impl"] == impl and r["status"] == "ok"]
        if not pts:
            continue
        hw = [r["hw"] for r in pts]
        axes[0].loglog(hw, [r["peak_mib"] for r in pts], style, label=f"{embed} {impl}")
        axes[1].loglog(hw, [r["time_s"] * 1e3 for r in pts], style, label=f"{embed} {impl}")
    fused = sorted((r["hw"], r["peak_mib"]) for r in rows if r["impl"] == "fused" and r["status"] == "ok")
    if fused:  # a line proportional to H*W through the smallest fused point, for reference
        hw0, mem0 = fused[0]
        xs = [hw0, max(h for h, _ in fused)]
        axes[0].loglog(xs, [mem0 * x / hw0 for x in xs], ":", color="gray", label="proportional to H*W")
    for ax, ylabel in zip(axes, ("peak memory (MiB)", "forward + backward (ms)")):
        ax.set_xlabel("H*W (positions)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title.split(";")[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def describe_env(args) -> str:
    import torch

    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    return f"torch {torch.__version__}, {where}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[14, 32, 64, 96])
    ap.add_argument("--embeds", nargs="+", default=["rel2d", "flat"], choices=["rel2d", "flat"])
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--impls", nargs="+", default=["reference", "fused", "official"],
                    choices=["reference", "fused", "official"], help="official: with --official-root")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-gb", type=float, default=16.0)
    ap.add_argument("--official-root", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--embed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.report_only:
        write_report(json.loads((Path(args.out) / f"layer_{args.device}.json").read_text())["rows"], args)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    write_report(run_all(args), args)


if __name__ == "__main__":
    main()
