"""Export a lesa model for deployment, checked against eager PyTorch.

* ``.onnx``: ONNX through ``torch.export`` and PyTorch's dynamo-based exporter
  (``torch.onnx.export(..., dynamo=True)``; needs ``onnx`` and ``onnxscript``: ``pip install 'lesa[export]'``),
  or with ``exporter='torchscript'`` through the TorchScript-based one (``dynamo=False``: what timm's
  ``onnx_export`` and most TensorRT / OpenVINO pipelines call; opset 13 or later, default 17), then run by
  onnxruntime (when installed) on the example input;
* ``.pt2``: a ``torch.export`` program (``torch.export.load`` reads it), run on the example input.

The attention layers export the path they run (see :mod:`lesa.layers.binary`): the reference path, or the
fused one in the forms graph capture takes (query blocks without a custom autograd function for 'flat',
one ``scaled_dot_product_attention`` call for 'rel2d'). ``lesa export CHECKPOINT out.onnx`` is the command line.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .errors import ConfigError, NotFoundError
from .utils import atomic_write

FORMATS = {".onnx": "onnx", ".pt2": "torch.export"}
# Exported graphs agree with eager PyTorch to float32 rounding: elementwise within this fraction of the
# output's largest magnitude (reordered sums and fused kernels change the last bits, nothing more).
TOLERANCE = 1e-4
EXPORTERS = ("dynamo", "torchscript")  # torch.onnx.export(..., dynamo=True / False)
# the oldest ONNX opset each exporter writes for lesa's models (dynamo: PyTorch's own floor; TorchScript:
# the oldest that has every operator they use), and the TorchScript exporter's default
MIN_OPSET = {"dynamo": 18, "torchscript": 13}
TORCHSCRIPT_OPSET = 17


def example_input(model: nn.Module, batch_size: int = 1, img_size: Optional[int] = None, seed: int = 0) -> Tensor:
    """A random ``(batch_size, C, H, W)`` input of the model's size (its ``pretrained_cfg``)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    channels, height, width = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    if img_size:
        height = width = img_size
    return torch.randn(batch_size, channels, height, width, generator=torch.Generator().manual_seed(seed))


def _dynamic_shapes(dynamic_batch: bool) -> Optional[dict[str, Any]]:
    return {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None


def export_program(model: nn.Module, example: Tensor, dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the model in eval mode (batch dimension dynamic with ``dynamic_batch``)."""
    return torch.export.export(model.eval(), (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {' and '.join(missing)}: pip install 'lesa[export]' (onnx, onnxscript "
                          "and onnxruntime to check the result)")


def export_onnx(model: nn.Module, path: str | Path, example: Tensor, dynamic_batch: bool = False,
                opset: Optional[int] = None, exporter: str = "dynamo") -> None:
    """Write the model (eval mode) as one ONNX file through the ``exporter`` of :data:`EXPORTERS`.

    Raises:
        ConfigError: an unknown exporter, an opset it cannot write, or onnx / onnxscript missing.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    require_onnx()
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET[exporter] <= opset <= newest:
        raise ConfigError(f"opset {opset} is not available: choose {MIN_OPSET[exporter]}..{newest} (the {exporter} "
                          f"exporter writes opset {MIN_OPSET[exporter]} or later for lesa's models; the installed onnx "
                          f"knows up to {newest}), or leave the default")
    if exporter == "torchscript":
        buffer = io.BytesIO()
        axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
        with warnings.catch_warnings():  # the checks of input sizes trace as constants: the graph is for this size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model.eval(), (example,), buffer, dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset or TORCHSCRIPT_OPSET)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
        return
    with _quiet_logger("onnxscript"):  # its optimiser warns of every constant it leaves unfolded
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["x"],
                                    output_names=["logits"], dynamic_shapes=_dynamic_shapes(dynamic_batch),
                                    opset_version=opset, verbose=False)
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_onnx(path: str | Path, x: Tensor) -> Optional[Tensor]:
    """The ONNX model's output on ``x`` with onnxruntime (``None`` when onnxruntime is not installed)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0])


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (the scale of the output)."""
    scale = float(expected.abs().max()) or 1.0
    return float((actual.float() - expected.float()).abs().max()) / scale


def export_model(model: nn.Module, output: str | Path, batch_size: Optional[int] = None,
                 img_size: Optional[int] = None, opset: Optional[int] = None, check: bool = True,
                 exporter: str = "dynamo") -> dict[str, Any]:
    """Export ``model`` (in eval mode, on the CPU) to ``output`` (``.onnx`` or ``.pt2``) for any batch size, or
    for ``batch_size`` only, ONNX through ``exporter`` (:data:`EXPORTERS`); with ``check``, run the exported
    graph on random inputs (batch sizes 2 and 1, or ``batch_size``) and compare it with eager PyTorch. Returns
    what was written and how it was checked."""
    output = Path(output)
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise ConfigError(f"output {str(output)!r}: use a .onnx (ONNX) or .pt2 (torch.export program) file name")
    if not output.parent.is_dir():
        raise NotFoundError(f"output directory {str(output.parent)!r} does not exist: create it first")
    if opset is not None and fmt != "onnx":
        raise ConfigError("--opset applies to .onnx outputs only")
    if exporter != "dynamo" and fmt != "onnx":
        raise ConfigError("--exporter applies to .onnx outputs only (a .pt2 file is a torch.export program)")
    model = model.cpu().eval()
    dynamic_batch = batch_size is None
    # traced with two images: export would take a batch of one for a constant
    example = example_input(model, 2 if dynamic_batch else batch_size, img_size)
    if fmt == "onnx":
        export_onnx(model, output, example, dynamic_batch, opset, exporter)
    else:
        buffer = io.BytesIO()
        torch.export.save(export_program(model, example, dynamic_batch), buffer)
        atomic_write(output, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    result: dict[str, Any] = dict(path=str(output), format=fmt if fmt != "onnx" else f"onnx, {exporter} exporter",
                                  input_shape=tuple(example.shape),
                                  dynamic_batch=dynamic_batch, checked_with=None, max_rel_error=None)
    if not check:
        return result
    inputs = [example] + ([example_input(model, 1, img_size, seed=1)] if dynamic_batch else [])
    runner = "onnxruntime" if fmt == "onnx" else "torch.export.load"
    errors = []
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
            if fmt == "onnx":
                actual = run_onnx(output, x)
                if actual is None:
                    return dict(result, checked_with="not checked: onnxruntime is not installed")
            else:
                actual = torch.export.load(str(output)).module()(x)
        if actual.shape != expected.shape:
            raise RuntimeError(f"the exported graph's output has shape {tuple(actual.shape)}, eager PyTorch's "
                               f"{tuple(expected.shape)} (a bug in lesa's export: please report it)")
        errors.append(max_relative_error(actual, expected))
    if max(errors) > TOLERANCE:
        raise RuntimeError(f"the exported graph ({runner}) differs from eager PyTorch by {max(errors):.2e} of the "
                           f"output's scale (more than float32 rounding, {TOLERANCE:g}): a bug in lesa's export, "
                           "please report it")
    return dict(result, checked_with=runner, max_rel_error=max(errors))
