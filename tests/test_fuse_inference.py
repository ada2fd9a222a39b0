"""lesa.fuse_for_inference: every BatchNorm it can fold is folded, the function is unchanged (float64),
a fused model refuses to train, and analyses that need the unfused model say so; in eval mode the logit
BatchNorm needs no batch moments."""
import copy

import pytest
import torch
from helpers import bn_affines, calibrated, image

import lesa
from lesa.analysis import ablate_unary
from lesa.errors import ConfigError


def model_and_input(name, **kw):
    """A float64 model whose BatchNorms have non-trivial affines and data-like running statistics, in eval mode,
    and a batch of four images of its input size."""
    torch.manual_seed(0)
    model = calibrated(bn_affines(lesa.create_model(name, **kw).double()))
    return model, image(4, model.pretrained_cfg["input_size"][-1], dtype=torch.float64)


@pytest.mark.parametrize("name,kw", [
    ("lesa_resnet_tiny", {}),
    ("lesa_resnet_tiny", {"pos_embed": "rel2d"}),
    ("lesa_resnet_tiny", {"impl": "reference"}),
    ("static_lesa_resnet_tiny", {}),
    ("sa_resnet_tiny", {}),
    ("resnet_tiny", {}),
])
def test_fused_model_computes_the_same_function(name, kw):
    model, x = model_and_input(name, **kw)
    with torch.no_grad():
        expected = model(x)
        fused = lesa.fuse_for_inference(copy.deepcopy(model))
        actual = fused(x)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    left = [n for n, m in fused.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # only the attention-logit BNs (eval mode makes them per-head scales) and the block's BN after an
    # SA / static-LESA layer (no convolution to fold it into) remain
    assert all(n.endswith("bn_logits") or (not name.startswith("lesa_") and n.endswith("bn2")) for n in left), left
    assert any(n.endswith("bn_logits") for n in left) or name == "resnet_tiny"


def test_fused_model_refuses_training_and_the_unary_ablation():
    model, x = model_and_input("lesa_resnet_tiny")
    fused = lesa.fuse_for_inference(model)
    with pytest.raises(ConfigError, match="fused for inference"):
        fused.train()(x)
    fused.eval()
    with pytest.raises(ConfigError, match="unfused model"), ablate_unary(fused), torch.no_grad():
        fused(x)


@pytest.mark.parametrize("pos_embed,impl", [("flat", "auto"), ("rel2d", "fused")])
def test_eval_needs_no_logit_moments(monkeypatch, pos_embed, impl):
    """In eval mode the logit BN's scales come from its running statistics alone: with the batch-moment
    functions gone the eval output is bitwise the same, while training mode, whose scales are those
    moments, cannot run without them."""
    from lesa.layers import binary

    model, x = model_and_input("lesa_resnet_tiny", pos_embed=pos_embed, impl=impl)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(binary, "sliding_window_moments", None)
    monkeypatch.setattr(binary, "dot_product_moments", None)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        with pytest.raises(TypeError, match="not callable"):
            model.train()(x)
