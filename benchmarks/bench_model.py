"""Whole-model speed and memory: lesa models against the authors' code, torchvision's resnet50 and timm's
botnet50ts (the attention-ResNet peer).

Two tasks:

* ``classification`` (224x224): inference (eval, no grad) and training-step (forward, backward, SGD step)
  images per second, peak memory of a training step, GMACs of one image.
* ``detection``: the backbone at the paper's detection size (1024x1024, last stride 2, the 2-D relative
  embedding, batch 1), forward + backward: seconds, peak memory; the authors' layer with and without its
  gradient checkpointing (``with_cp_UB_terms_only``).

Every measurement runs in a fresh process (so peak memory is that configuration's alone; how it is
measured: ``measure.py``); configurations are interleaved over ``--rounds`` rounds and the median is
reported. A configuration that would need more than ``--max-gb`` is reported as out of memory.

    python benchmarks/bench_model.py --official-root PATH/TO/LESA_classification            # CPU, 2 threads
    python benchmarks/bench_model.py --task detection --official-root PATH/TO/LESA_classification
    python benchmarks/bench_model.py --configs lesa lesa+channels_last lesa+compile       # the gains

Configurations: ``lesa`` (lesa_resnet50, defaults), ``lesa-reference`` (impl='reference', the official
computation in our code), ``official`` (needs ``--official-root``; ``official+cp`` with the authors' gradient
checkpointing), ``torchvision``, ``botnet`` (timm); ``+channels_last`` / ``+compile`` / ``+fused`` (lesa
with :func:`lesa.fuse_for_inference` for inference) suffixes combine.
Writes ``<out>/model_<task>_<device>.json``, ``.md`` (table) and ``.png`` (figure); ``--from-json`` re-renders them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from measure import cap_memory, measure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {
    "classification": ["lesa", "lesa-reference", "official", "torchvision", "botnet"],
    "detection": ["lesa", "lesa-reference", "official", "official+cp", "torchvision"],
}


def build(name: str, args: argparse.Namespace):
    """The model of configuration ``name`` (without suffixes) and the function giving its output for
    the task (logits, or the backbone's last feature map)."""
    import torch

    detection = args.task == "detection"
    base, *flags = name.split("+")
    if base.startswith("lesa"):
        from lesa.models import create_model

        kw = dict(impl="reference") if base == "lesa-reference" else {}
        if detection:
            kw.update(pos_embed="rel2d", last_stride=2, img_size=args.size)
        model = create_model(args.model, **kw)
        return model, (model.forward_features if detection else model)
    if base == "official":
        sys.path.insert(0, str(ROOT / "tools"))
        import official_parity as op

        resnet = op.import_official(Path(args.official_root))
        cfg = op.official_config("wide" in args.model, "detection_qr" if detection else "classification")
        if detection:
            cfg.update(strides=(1, 2, 2, 2), stage_spatial_res=[args.size // s for s in (4, 8, 16, 32)])
        cfg.lesa["with_cp_UB_terms_only"] = "cp" in flags
        if "wide" in args.model:
            raise SystemExit("official: only --model lesa_resnet50 is wired here")
        net = resnet.resnet50(cfg=cfg, num_classes=1000)
        if detection:  # stage 4's first LESA sees stage 3's map (the classification code sizes it for its output)
            block = net.layer4[0]
            block.conv2 = resnet.lesa3x3(lesa=cfg.lesa, in_planes=512, out_planes=512, kernel_size=args.size // 16,
                                         stride=2)
        return net, (official_features(net) if detection else net)
    if base == "torchvision":
        import torchvision

        net = torchvision.models.resnet50()
        return net, (torch.nn.Sequential(*list(net.children())[:-2]) if detection else net)
    if base == "botnet":
        import timm

        net = timm.create_model("botnet50ts_256", img_size=args.size)
        return net, (net.forward_features if detection else net)
    raise SystemExit(f"unknown configuration {name!r}")


def official_features(net):
    def run(x):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    return run


def worker(name: str, mode: str, args: argparse.Namespace) -> dict:
    if args.device == "cpu":
        cap_memory(args.max_gb)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = name.split("+")[1:]
    model, run = build(name, args)
    memory_format = torch.channels_last if "channels_last" in flags else torch.contiguous_format
    model = model.to(args.device, memory_format=memory_format)
    batch = 1 if args.task == "detection" else args.batch
    x = torch.randn(batch, 3, args.size, args.size, device=args.device).contiguous(memory_format=memory_format)
    if mode == "gmacs":
        from torch.utils.flop_counter import FlopCounterMode

        model.eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run(x[:1])
        return dict(status="ok", gmacs=counter.get_total_flops() / 2e9)
    train = mode == "train"
    model.train(train)
    if "fused" in flags and not train:
        import lesa

        lesa.fuse_for_inference(model)
    if "compile" in flags:
        run = torch.compile(run)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train else None

    def step():
        if not train:
            with torch.no_grad():
                run(x)
            return
        out = run(x)
        loss = out.float().square().mean() if args.task == "detection" else out.float().logsumexp(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.task == "classification":
            optimizer.step()

    result = measure(step, args.device, warmup=args.warmup, iters=args.iters)
    if result["status"] != "ok":
        return result
    seconds = statistics.median(result["times"])
    peak = result["peak_mib"]
    return dict(status="ok", seconds=seconds, images_per_s=batch / seconds, peak_mib=peak)


def modes(task: str) -> list[str]:
    return ["gmacs", "infer", "train"] if task == "classification" else ["train"]


def run_all(args: argparse.Namespace) -> dict:
    """``{config: {mode: [result per round]}}``, configurations interleaved within each round."""
    results: dict = {name: {mode: [] for mode in modes(args.task)} for name in args.configs}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("configs", "out", "worker", "tag") and v is not None]
    for round_ in range(args.rounds):
        for mode in modes(args.task):
            if mode == "gmacs" and round_:
                continue
            for name in args.configs:
                try:
                    proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", f"{name}:{mode}"],
                                          capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    proc = subprocess.CompletedProcess([], 1, "", f"timed out after {args.timeout} s")
                if proc.returncode == 0:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                else:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    status = "out of memory" if "MemoryError" in tail or "memory" in tail.lower() else "failed"
                    result = dict(status=status, error=tail[:300])
                results[name][mode].append(result)
                print(name, mode, result, flush=True)
    return results


def summarise(results: dict) -> dict:
    table = {}
    for name, by_mode in results.items():
        row = {}
        for mode, runs in by_mode.items():
            ok = [r for r in runs if r["status"] == "ok"]
            if not ok:
                row[mode] = runs[0]["status"] if runs else "not run"
                continue
            if mode == "gmacs":
                row["gmacs"] = ok[0]["gmacs"]
                continue
            row[f"{mode}_images_per_s"] = statistics.median(r["images_per_s"] for r in ok)
            row[f"{mode}_seconds"] = statistics.median(r["seconds"] for r in ok)
            row[f"{mode}_peak_mib"] = statistics.median(r["peak_mib"] for r in ok)
            row[f"{mode}_rounds"] = [round(r["images_per_s"], 3) for r in ok]
        table[name] = row
    return table


def markdown(table: dict, args: argparse.Namespace, env: str) -> str:
    def cell(row, key, fmt):
        value = row.get(key)
        return fmt.format(value) if isinstance(value, float) else str(row.get(key.split("_")[0], "-"))

    base = "official" if "official" in table else next(iter(table))  # ratios against the authors' code
    ref = table[base]
    if args.task == "classification":
        lines = [f"{args.model}-class models at {args.size}x{args.size}, batch {args.batch}; {env}", "",
                 f"| model | GMACs | inference img/s | vs {base} | train step img/s | vs {base} | train peak MiB |",
                 "|---|---|---|---|---|---|---|"]
        for name, row in table.items():
            ratios = []
            for mode in ("infer", "train"):
                a, b = row.get(f"{mode}_images_per_s"), ref.get(f"{mode}_images_per_s")
                ratios.append(f"{a / b:.2f}x" if a and b else "-")
            lines.append(f"| {name} | {cell(row, 'gmacs', '{:.2f}')} | {cell(row, 'infer_images_per_s', '{:.2f}')} | "
                         f"{ratios[0]} | {cell(row, 'train_images_per_s', '{:.2f}')} | {ratios[1]} | "
                         f"{cell(row, 'train_peak_mib', '{:.0f}')} |")
    else:
        lines = [f"backbones at {args.size}x{args.size}, batch 1, forward + backward; {env}", "",
                 "| backbone | seconds | peak MiB |", "|---|---|---|"]
        for name, row in table.items():
            lines.append(f"| {name} | {cell(row, 'train_seconds', '{:.2f}')} | "
                         f"{cell(row, 'train_peak_mib', '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, args: argparse.Namespace, path: Path) -> None:
    """Bars: images/s (classification: inference and training) or seconds and peak GiB (detection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    if args.task == "classification":
        panels = [("infer_images_per_s", "inference (images/s)"), ("train_images_per_s", "training step (images/s)")]
    else:
        panels = [("train_seconds", "forward + backward (s)"), ("train_peak_mib", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * len(names) + 1.5))
    for ax, (key, label) in zip(axes, panels):
        values = [table[n].get(key) if isinstance(table[n].get(key), float) else 0.0 for n in names]
        ax.barh(names, values, color=["C1" if n.startswith("official") else "C0" for n in names])
        for y, value in enumerate(values):
            text = f" {value:.0f}" if value >= 100 else f" {value:.3g}" if value else " n/a"
            ax.text(value, y, text, va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    size = f"{args.size}x{args.size}"
    fig.suptitle(f"{args.task} at {size}, batch {args.batch if args.task == 'classification' else 1}, "
                 f"{args.threads} threads ({args.device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe_env(args: argparse.Namespace) -> str:
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return (f"{args.device} ({device}), {args.threads} threads, torch {torch.__version__}, "
            f"median of {args.rounds} interleaved rounds x {args.iters} iterations")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["classification", "detection"], default="classification")
    ap.add_argument("--configs", nargs="+")
    ap.add_argument("--model", default="lesa_resnet50")
    ap.add_argument("--official-root")
    ap.add_argument("--size", type=int)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    ap.add_argument("--tag", default="", help="suffix of the output files' names")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--from-json", type=Path, help="re-render a saved result's table and figure")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        args = argparse.Namespace(**{**saved["config"], "from_json": args.from_json})
        table = saved["results"]
        args.from_json.with_suffix(".md").write_text(markdown(table, args, saved.get("env", "")))
        plot(table, args, args.from_json.with_suffix(".png"))
        return
    args.size = args.size or (224 if args.task == "classification" else 1024)
    if args.worker:
        name, mode = args.worker.rsplit(":", 1)
        print(json.dumps(worker(name, mode, args)))
        return
    args.configs = args.configs or [c for c in DEFAULT_CONFIGS[args.task]
                                    if args.official_root or not c.startswith("official")]
    table = summarise(run_all(args))
    env = describe_env(args)
    text = markdown(table, args, env)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"model_{args.task}_{args.device}" + (f"_{args.tag}" if args.tag else "")
        (out / f"{stem}.json").write_text(json.dumps(dict(config=vars(args), env=env, results=table), indent=1))
        (out / f"{stem}.md").write_text(text)
        plot(table, args, out / f"{stem}.png")


if __name__ == "__main__":
    main()
