"""Check that lesa reproduces the authors' code: same outputs from the same (converted) weights.

Runs the official implementation from *your* checkout of Chenglin-Yang/LESA_classification (nothing of it
is part of this repository), builds its LESA ResNet with random weights and randomised BatchNorm
statistics, saves it as the official training script does (``{'net': DataParallel state dict}``),
converts it with :func:`lesa.convert_official_state_dict`, loads it strictly into the matching lesa model
and compares outputs, gradients and updated BN statistics in eval and train mode, for every ``impl``.

In float64 everything must agree to 1e-9 (the implementations are the same function). In float32 the
outputs and BN statistics must agree to ``--tol``; gradients are printed but not judged there: the
backward pass of a randomly initialised ResNet is ill-conditioned (the official code's own float32 input
gradient is ~1e-2 away from its float64 one), so float32 gradients of any two implementations differ at
that level.

    pip install einops            # the official code's only extra dependency (mmcv is stubbed: no DCN)
    python tools/official_parity.py --official-root PATH/TO/LESA_classification [--model lesa_resnet50]

Exits non-zero if any relative error exceeds ``--tol`` (default 1e-4).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
import types
from pathlib import Path

import torch

import lesa
from lesa.models import create_model


class AttrDict(dict):
    """The subset of mmcv's ConfigDict the official code uses (attribute and item access)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def import_official(root: Path):
    mmcv = types.ModuleType("mmcv")
    mmcv_cnn = types.ModuleType("mmcv.cnn")

    def build_conv_layer(*args, **kwargs):
        raise NotImplementedError("mmcv stub: deformable convolutions are not part of this check")

    mmcv_cnn.build_conv_layer = build_conv_layer
    mmcv.cnn = mmcv_cnn
    sys.modules.update({"mmcv": mmcv, "mmcv.cnn": mmcv_cnn})
    package = types.ModuleType("official_models")
    package.__path__ = [str(root / "lib" / "models")]
    sys.modules["official_models"] = package
    return importlib.import_module("official_models.resnet")


def official_config(wrn: bool, pe_type: str) -> AttrDict:
    lesa_cfg = AttrDict(
        type="LESA", with_cp_UB_terms_only=False, pe_type=pe_type, groups=8,
        df_channel_shrink=[2], df_kernel_size=[1, 1], df_group=[1, 1],
    )
    return AttrDict(
        strides=(1, 2, 2, 1), wrn=wrn, stage_spatial_res=[56, 28, 14, 14],
        stage_with_first_conv=[True, True, True, False], lesa=lesa_cfg,
        stage_with_lesa=(False, False, True, True),
    )


@torch.no_grad()
def randomise_bn(model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    """Random BN affines; running statistics of one training batch (realistic for eval mode).

    Variances are floored at 0.01: a channel that happened to be constant over the small batch would
    otherwise divide float32 rounding noise by sqrt(eps) in eval mode (trained networks have no such
    channels), and the comparison would measure that amplification instead of the implementations.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        m.reset_running_stats()
        m.momentum = None
    model.train()(x)
    for m in bns:
        m.momentum = 0.1
        m.running_var.clamp_(min=0.01)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-root", required=True, type=Path)
    ap.add_argument("--model", default="lesa_resnet50", choices=["lesa_resnet50", "lesa_wide_resnet50_2"])
    ap.add_argument("--pos-embed", default="both", choices=["flat", "rel2d", "both"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--dtype", default="both", choices=["float32", "float64", "both"])
    args = ap.parse_args()

    official = import_official(args.official_root)
    failures = 0
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    embeds = ("flat", "rel2d") if args.pos_embed == "both" else (args.pos_embed,)
    for dtype_name, pos_embed in [(d, p) for d in dtypes for p in embeds]:
        pe_type = "classification" if pos_embed == "flat" else "detection_qr"
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        dtype = getattr(torch, dtype_name)
        tol = 1e-9 if dtype == torch.float64 else args.tol
        ref = official.resnet50(cfg=official_config("wide" in args.model, pe_type), num_classes=1000)
        ref = ref.to(dtype)
        x = torch.randn(args.batch, 3, 224, 224, generator=gen, dtype=dtype)
        randomise_bn(ref, torch.randn(8, 3, 224, 224, generator=gen, dtype=dtype), gen)
        ckpt = {"net": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 94}
        converted = lesa.convert_official_state_dict(ckpt)
        for impl in ("reference", "fused"):
            ours = create_model(args.model, pos_embed=pos_embed, impl=impl).to(dtype)
            ours.load_state_dict(converted, strict=True)
            for mode in ("eval", "train"):
                a, b = copy.deepcopy(ours), copy.deepcopy(ref)
                a.train(mode == "train")
                b.train(mode == "train")
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya, yb = a(xa), b(xb)
                ya.square().sum().backward()
                yb.square().sum().backward()
                errs = {"output": rel_err(ya, yb), "input grad": rel_err(xa.grad, xb.grad)}
                ref_after = lesa.convert_official_state_dict(b.state_dict())
                ours_after = a.state_dict()
                errs["BN stats"] = max(
                    rel_err(ours_after[k].double(), v.double())
                    for k, v in ref_after.items()
                    if "running" in k
                )
                ref_grads = lesa.convert_official_state_dict(
                    {n: p.grad for n, p in b.named_parameters() if p.grad is not None}
                )
                # The logit BN's bias has an exactly zero gradient (softmax is shift invariant).
                errs["param grads"] = max(
                    rel_err(p.grad, ref_grads[n]) for n, p in a.named_parameters()
                    if n in ref_grads and not n.endswith("bn_logits.bias")
                )
                judged = errs if dtype == torch.float64 else {k: errs[k] for k in ("output", "BN stats")}
                worst = max(judged.values())
                failures += worst > tol
                status = "ok" if worst <= tol else "FAIL"
                detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
                print(f"{args.model} {dtype_name} {pos_embed:5s} {impl:9s} {mode:5s}: {detail}  [{status}]")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
