"""lesa.fuse_for_inference: every BatchNorm it can fold is folded, the function is unchanged (float64),
a fused model refuses to train, and analyses that need the unfused model say so."""
import copy

import pytest
import torch

import lesa
from lesa.analysis import ablate_unary
from lesa.errors import ConfigError


def calibrated(name, dtype=torch.float64, **kw):
    """A model whose BatchNorms have non-trivial affines and running statistics."""
    torch.manual_seed(0)
    model = lesa.create_model(name, **kw).to(dtype)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(4, 3, size, size, dtype=dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for _ in range(2):
            model.train()(x)
    return model.eval(), x


@pytest.mark.parametrize("name,kw", [
    ("lesa_resnet_tiny", {}),
    ("lesa_resnet_tiny", {"pos_embed": "rel2d"}),
    ("lesa_resnet_tiny", {"impl": "reference"}),
    ("static_lesa_resnet_tiny", {}),
    ("sa_resnet_tiny", {}),
    ("resnet_tiny", {}),
])
def test_fused_model_computes_the_same_function(name, kw):
    model, x = calibrated(name, **kw)
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
    model, x = calibrated("lesa_resnet_tiny")
    fused = lesa.fuse_for_inference(model)
    with pytest.raises(ConfigError, match="fused for inference"):
        fused.train()(x)
    fused.eval()
    with pytest.raises(ConfigError, match="unfused model"), ablate_unary(fused), torch.no_grad():
        fused(x)


def test_eval_needs_no_logit_moments(monkeypatch):
    """In eval mode the logit BN's scales come from its running statistics alone."""
    from lesa.layers import binary

    model, x = calibrated("lesa_resnet_tiny")
    monkeypatch.setattr(binary, "sliding_window_moments", None)
    monkeypatch.setattr(binary, "dot_product_moments", None)
    with torch.no_grad():
        model(x)
