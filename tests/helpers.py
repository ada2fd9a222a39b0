"""Helpers the test files share (conftest.py puts this folder on ``sys.path``: ``from helpers import ...``).

Tensors and comparisons, BatchNorms with something to normalise, the command line run in this process, and
image folders on disk. Shared fixtures (a finished digits run, digit scenes) are in conftest.py.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from PIL import Image


# -- tensors and comparisons ------------------------------------------------------------------------------
def image(batch: int = 2, size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``(batch, 3, size, size)`` batch of standard normal pixels, the same for the same seed."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, name: str = "") -> None:
    """Relative agreement: elementwise to ``rtol`` of the tensor's scale (tiny entries are not judged on their
    own relative error, which float32 rounding makes meaningless)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.detach().abs().max()),
                               msg=lambda m: f"{name}: {m}" if name else m)


def assert_same_step(ref, fused, x, dtype, context=contextlib.nullcontext) -> None:
    """One forward (inside ``context()``) and backward (outside it: checkpointed layers recompute there) of two
    implementations in the modules' current mode: outputs, all gradients and BN buffers agree to ``RTOL[dtype]``."""
    rtol = RTOL[dtype]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with context():
        ya, yb = ref(xa), fused(xb)
    close(yb, ya, rtol, "output")
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    close(xb.grad, xa.grad, rtol, "input gradient")
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if name.endswith("bn_logits.bias"):  # softmax is shift invariant: zero up to rounding in both
            assert max(a.grad.abs().max(), b.grad.abs().max()) < 1e-3 * ya.detach().abs().max()
            continue
        close(b.grad, a.grad, rtol, name)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        close(b.to(a.dtype), a, rtol, name)


# -- BatchNorms with something to normalise (a fresh one is the identity in eval mode) -----------------------
@torch.no_grad()
def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial affines and running statistics in every BatchNorm, from a generator of its own (seed 1)."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return module


@torch.no_grad()
def bn_affines(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial affines in every BatchNorm (weights in [0.5, 1.5], biases in [-0.2, 0.2]) from the global RNG;
    the running statistics are left as they are."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    return module


def calibrated(model: torch.nn.Module, size: int | None = None, steps: int = 2) -> torch.nn.Module:
    """``steps`` training-mode passes over batches of four images (seeds 100, 101, ...) so that the BatchNorms
    hold data-like statistics, then eval mode. ``size``: the model's ``pretrained_cfg`` input size by default;
    the images take the model's dtype."""
    size = size or model.pretrained_cfg["input_size"][-1]
    dtype = next(model.parameters()).dtype
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(image(4, size, 100 + i, dtype))
    return model.eval()


# -- the command line -----------------------------------------------------------------------------------------
def cli(*args) -> tuple[int, str]:
    """``lesa ARGS`` in this process: the exit code and stderr, checked to hold no traceback and at most one line
    besides Python's own warning lines."""
    from lesa.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    text = err.getvalue().strip()
    lines = [line for line in text.splitlines() if "Warning" not in line and not line.startswith("  ")]
    assert "Traceback" not in text and len(lines) <= 1, text
    return code, text


# -- data on disk ---------------------------------------------------------------------------------------------
def image_folder(root: Path, classes=("cat", "dog"), n: int = 2, size=(40, 30), val_classes=None,
                 bad: int = 0) -> Path:
    """An image-folder data set: ``root/{train,val}/CLASS/I.png``, ``n`` plain images a class (``size`` = width x
    height, a colour per class and image); ``val_classes`` if val's differ; ``bad`` undecodable ``.jpg`` files
    in the first training class."""
    for split, names in (("train", classes), ("val", classes if val_classes is None else val_classes)):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, ((40 * c + 5 * i) % 256, 100, 200)).save(folder / f"{i}.png")
    for i in range(bad):
        (root / "train" / classes[0] / f"broken{i}.jpg").write_bytes(b"not an image")
    return root
