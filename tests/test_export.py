"""torch.compile (fullgraph), torch.export and ONNX compute what eager PyTorch does; ``lesa export``.

torch.compile runs with the ``aot_eager`` backend here: it captures the whole graph (``fullgraph=True`` fails
on any break) and traces forward and backward through AOTAutograd, which is where capture can fail; the
inductor backend's code generation is measured by hand on lesa_resnet50 (docs/performance.md), as it
takes minutes on a CPU.
"""
import copy
import importlib.util

import pytest
import torch
from helpers import calibrated, close, image

import lesa
from lesa import LESA2d
from lesa.classification import load_trained_model
from lesa.cli import main
from lesa.convert import save_state_dict
from lesa.errors import ConfigError
from lesa.export import export_model

CASES = [("flat", "reference"), ("flat", "fused"), ("rel2d", "reference"), ("rel2d", "fused")]


def compiled(module):
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True, backend="aot_eager")


def grads_and_buffers(module, x):
    named = {f"grad {n}": p.grad for n, p in module.named_parameters() if p.grad is not None}
    named.update({f"buffer {n}": b for n, b in module.named_buffers()})
    return dict(named, input_grad=x.grad)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pos_embed,impl,size", [
    ("flat", "reference", (4, 5)), ("flat", "fused", (4, 5)),
    ("flat", "auto", (4, 5)),  # one block of all queries: the dense kernel (custom autograd function)
    ("rel2d", "reference", (4, 5)), ("rel2d", "fused", (4, 5)),
    ("rel2d", "fused", (18, 2)),  # more than 16 rows: the CPU key-row split (custom autograd function)
])
def test_compile_fullgraph_matches_eager_float64(pos_embed, impl, size, training):
    torch.manual_seed(0)
    layer = LESA2d(16, 16, heads=2, pos_embed=pos_embed, feature_size=size, impl=impl).double().train(training)
    layer.binary.block_elems = 2 * 2 * 20 * 8  # 'flat' fused: query blocks of 8, 8 and 4 (of 20)
    eager = copy.deepcopy(layer)
    x = torch.randn(2, 16, *size, dtype=torch.float64, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    out = compiled(layer)(x)
    expected = eager(x_eager)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    (expected * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    ours, theirs = grads_and_buffers(layer, x), grads_and_buffers(eager, x_eager)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="torch.library.custom_op: torch >= 2.4")
def test_inductor_runs_the_dense_kernel_as_one_opaque_operator_float64():
    """Under inductor (the default backend) the 'flat' dense kernel is the ``lesa::flat_dense_attention``
    operator, forward and backward, not C++ loops generated from its skewed views (1.6x slower on the CPU,
    docs/performance.md): same values and gradients as eager in float64."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer = LESA2d(16, 16, heads=2, feature_size=(4, 5)).double()
    eager = copy.deepcopy(layer)
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    torch._dynamo.reset()
    step = torch.compile(lambda t: layer(t).square().sum().backward(), fullgraph=False)
    _, code = run_and_get_code(step, x)
    eager(x_eager).square().sum().backward()
    assert any("lesa.flat_dense_attention.default" in c for c in code), "the forward graph traced the kernel"
    assert any("lesa.flat_dense_attention_backward.default" in c for c in code), "the backward traced it"
    ours, theirs = grads_and_buffers(layer, x), grads_and_buffers(eager, x_eager)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-10, atol=1e-10, msg=name)


def test_compile_fullgraph_whole_model_trains_and_evaluates_as_eager():
    torch.manual_seed(0)
    model = lesa.create_model("lesa_resnet_tiny", pos_embed="flat", impl="fused", img_size=16)
    model.layer4[0].conv2.checkpoint = True  # gradient checkpointing is captured too
    eager = copy.deepcopy(model)
    x, target = image(4), torch.tensor([0, 1, 2, 3])
    step = compiled(model)
    for m, fn in ((model, step), (eager, eager)):
        m.train()
        torch.nn.functional.cross_entropy(fn(x), target).backward()
    # float32: gradients agree to rounding relative to the gradients' overall scale (some, such as the logit
    # BN's shift, are zero up to rounding)
    close(torch.cat([q.grad.flatten() for q in model.parameters()]),
          torch.cat([p.grad.flatten() for p in eager.parameters()]), rtol=1e-4)
    for b, c in zip(eager.buffers(), model.buffers()):
        close(c.float(), b.float(), rtol=1e-4)
    model.eval(), eager.eval()
    with torch.no_grad():
        close(step(x), eager(x))


@pytest.mark.parametrize("pos_embed,impl", CASES)
def test_torch_export_and_onnx_match_eager(pos_embed, impl, tmp_path):
    model = calibrated(lesa.create_model("lesa_resnet_tiny", pos_embed=pos_embed, impl=impl, img_size=16))
    x, single = image(2), image(1, seed=1)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    with torch.no_grad():
        for inputs in (x, single):
            close(program.module()(inputs), model(inputs), rtol=1e-5)
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    onnx_program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for inputs in (x, single):
            out = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
            close(torch.from_numpy(out), model(inputs), rtol=1e-5)


@pytest.mark.parametrize("pos_embed,impl", CASES)
def test_torchscript_onnx_and_jit_trace_match_eager(pos_embed, impl, tmp_path):
    """The exporter deployment tools call (``torch.onnx.export(..., dynamo=False)``), with a dynamic batch, and
    ``torch.jit.trace``."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = calibrated(lesa.create_model("lesa_resnet_tiny", pos_embed=pos_embed, impl=impl, img_size=16))
    x, other = image(2), image(3, seed=1)
    from lesa.export import export_onnx

    export_onnx(model, tmp_path / "m.onnx", x, dynamic_batch=True, exporter="torchscript")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with pytest.warns(torch.jit.TracerWarning):  # the input checks trace as constants, as they should
        traced = torch.jit.trace(model, (x,))
    with torch.no_grad():
        for inputs in (x, other):
            out = session.run(None, {"x": inputs.numpy()})[0]
            close(torch.from_numpy(out), model(inputs), rtol=1e-5)
            close(traced(inputs), model(inputs), rtol=1e-5)


# every operator on the small model, and the paper's ResNet-50 forms at a small input (the same graph; the
# wide_resnet50_2 forms differ in width only and were exported by hand: README, the export table)
TIMM_EXPORTED = lesa.list_models("*resnet_tiny") + [n for n in lesa.list_models("*_resnet50") if n != "resnet50"]


@pytest.mark.parametrize("name", TIMM_EXPORTED)
def test_timm_onnx_export_takes_the_attention_models(name, tmp_path):
    """timm's own exporter (``timm.utils.onnx.onnx_export``: TorchScript-based, a dynamic batch, the ONNX
    checker)."""
    pytest.importorskip("onnx")
    timm = pytest.importorskip("timm")
    from timm.utils.onnx import onnx_export

    size = 32 if name.endswith("_tiny") else 64
    model = timm.create_model(name, **({} if name == "resnet_tiny" else {"img_size": size})).eval()
    onnx_export(model, str(tmp_path / "m.onnx"), example_input=torch.randn(1, 3, size, size), check=True)
    assert (tmp_path / "m.onnx").stat().st_size > 0


# -- lesa export ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A trained-looking weights file of lesa_resnet_tiny (BN statistics of a few batches)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_state_dict(calibrated(lesa.create_model("lesa_resnet_tiny")).state_dict(), str(path))  # at 32 px
    return path


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="needs the export extra (onnx, onnxscript, onnxruntime)")
def test_lesa_export_onnx_end_to_end(weights, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(weights), str(out), "--model", "lesa_resnet_tiny"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"lesa_resnet_tiny -> {out} (onnx, dynamo exporter, input (N, 3, 32, 32) for any N): "
                           "matches eager PyTorch under onnxruntime")
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(out))
    model, _ = load_trained_model(weights, "lesa_resnet_tiny")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x in (image(1, 32), image(3, 32, seed=1)):  # any batch size: the file computes the model's function
        with torch.no_grad():
            expected = model.eval()(x)
        close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), expected, rtol=1e-5)


def test_lesa_export_torch_program(weights, tmp_path, capsys):
    out = tmp_path / "tiny.pt2"
    assert main(["export", str(weights), str(out), "--model", "lesa_resnet_tiny", "--batch-size", "3"]) == 0
    assert "(torch.export, input (3, 3, 32, 32)): matches eager PyTorch" in capsys.readouterr().out
    model, _ = load_trained_model(weights, "lesa_resnet_tiny")
    x = image(3, 32)
    with torch.no_grad():
        close(torch.export.load(str(out)).module()(x), model.eval()(x), rtol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["OUT/m.txt"], "OUTPUT: got 'OUT/m.txt'; use a file name ending in .onnx or .pt2"),
    (["OUT/missing/m.onnx"], "missing' does not exist: create it first"),
    (["OUT/m.onnx", "--batch-size", "0"], "--batch-size: got 0; use a value >= 1"),
    (["OUT/m.onnx", "--opset", "9"], "opset 9 is not available: choose 18.."),
    (["OUT/m.pt2", "--opset", "18"], "--opset applies to .onnx outputs only"),
])
def test_lesa_export_bad_input_says_the_fix(weights, tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    message = message.replace("OUT/", f"{tmp_path}/")
    assert main(["export", str(weights), *args, "--model", "lesa_resnet_tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lesa export: error: ")
    assert message in err, err


def test_lesa_export_bad_checkpoints(weights, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for args, message in (
        ([str(tmp_path / "none.pt")], "does not exist"),
        ([str(garbage), "--model", "lesa_resnet_tiny"], "garbage.pt"),
        ([str(weights)], "holds weights only: pass the model name (--model NAME)"),
        ([str(weights), "--model", "lesa_resnet50"], "does not fit"),
    ):
        assert main(["export", *args, str(tmp_path / "m.onnx")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_packages_are_named(monkeypatch, weights, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ConfigError, match=r"ONNX export needs onnxscript: pip install 'lesa\[export\]'"):
        export_model(lesa.create_model("resnet_tiny"), tmp_path / "m.onnx")
