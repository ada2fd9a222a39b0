"""The model family (lesa.models): parameter counts of Tables 2 and 6, torchvision equality, the paper's layout, a
whole-model gradient against finite differences, the timm interface and registration, the builder's option checks
and `lesa models`."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import image

import lesa
from lesa.cli import main
from lesa.errors import ConfigError
from lesa.models import attention_layers, create_model, list_models
from lesa.utils import count_params

# Tables 2 and 6 (millions, as printed). The WRN rows of the paper omit the 0.55M of the 'flat'
# position tables (the paper prints 60.6M for LESA-WRN50, the official code builds 61.15M): see
# test_wrn_counts_without_position_tables.
TABLED = {
    "resnet50": 25.56,
    "sa_resnet50": 18.06,
    "aa_resnet50": 25.15,
    "static_lesa_resnet50": 20.43,
    "lesa_resnet50": 23.78,
    "wide_resnet50_2": 68.88,
    "lesa_wide_resnet50_2": 61.15,
}


@pytest.mark.parametrize("name", sorted(TABLED))
def test_parameter_counts_as_tabled(name):
    assert round(count_params(create_model(name)) / 1e6, 2) == TABLED[name]


def test_wrn_counts_without_position_tables():
    for name, paper in (("sa_wide_resnet50_2", 37.7), ("lesa_wide_resnet50_2", 60.6)):
        model = create_model(name)
        tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("rel_pos.relative"))
        assert round((count_params(model) - tables) / 1e6, 1) == paper


def test_conv_baseline_is_torchvision_resnet50():
    ref = torchvision.models.resnet50().eval()
    ours = create_model("resnet50").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x))


def test_layout_follows_the_paper():
    model = create_model("lesa_resnet50")
    names = [n for n, _ in attention_layers(model)]
    # stage 3: blocks 1-5 (block 0 keeps its stride-2 conv); stage 4: all three blocks, stride 1.
    assert names == [f"layer3.{i}.conv2" for i in range(1, 6)] + [f"layer4.{i}.conv2" for i in range(3)]
    assert isinstance(model.layer3[0].conv2, torch.nn.Conv2d) and model.layer3[0].conv2.stride == (2, 2)
    assert all(m.binary.rel_pos.feature_size == (14, 14) for _, m in attention_layers(model))
    feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 2048, 14, 14)


@pytest.mark.parametrize("op", ["", "sa_", "aa_", "static_lesa_", "lesa_"])
def test_tiny_models_train_step_gradient_is_the_derivative_of_the_loss(op):
    """A training step of the whole model in float64 (train-mode BatchNorms, each layer on its default path):
    every parameter takes part, and the gradient's component along a random direction of all the weights, and
    of the attention layers' weights alone, is the central difference of the loss along that direction."""
    torch.manual_seed(0)
    model = create_model(f"{op}resnet_tiny", num_classes=10).double().train()
    x, target = image(4, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "bn_logits.bias" not in n)
    groups = [[p for p in model.parameters() if p.grad is not None],
              [p for _, m in attention_layers(model) for p in m.parameters() if p.grad is not None]]
    assert bool(groups[1]) == (op != "")
    for params in filter(None, groups):
        gen = torch.Generator().manual_seed(1)
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))

        @torch.no_grad()
        def loss_along(step, params=params, direction=direction):
            for p, d in zip(params, direction):
                p.add_(step * d)
            value = float(F.cross_entropy(model(x), target))
            for p, d in zip(params, direction):
                p.sub_(step * d)
            return value

        eps = 1e-10  # small enough that the steps cross no ReLU's kink; float64 rounding stays below 1e-5
        numeric = (loss_along(eps) - loss_along(-eps)) / (2 * eps)
        assert abs(analytic) > 0.1  # a direction the loss changes along
        assert numeric == pytest.approx(analytic, rel=1e-4), (numeric, analytic)


def test_timm_style_interface():
    model = create_model("lesa_resnet_tiny", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features == 512
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean((2, 3)))  # global average pooling, no pre-logits layer
        torch.testing.assert_close(model(x), model.fc(pre))
        model.reset_classifier(5)
        assert model.get_classifier().out_features == 5 and model.num_classes == 5
        torch.testing.assert_close(model(x), model.get_classifier()(pre))
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4, 4]


def test_kwargs_reach_the_layers():
    model = create_model("lesa_resnet_tiny", pos_embed="rel2d", impl="reference", heads=4, img_size=48)
    layers = [m for _, m in attention_layers(model)]
    assert all(m.binary.pos_embed == "rel2d" and m.binary.impl == "reference" for m in layers)
    assert all(m.binary.heads == 4 and m.binary.rel_pos.feature_size == (12, 12) for m in layers)


def test_timm_registration():
    """timm's builder builds the model lesa's does: the same weights from the same seed, the same function."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("lesa_resnet_tiny", num_classes=7).eval()
    torch.manual_seed(0)
    ours = create_model("lesa_resnet_tiny", num_classes=7).eval()
    assert isinstance(model, lesa.models.ResNet)
    theirs = model.state_dict()
    assert theirs.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x)) and model(x).shape == (1, 7)
    assert "lesa_resnet50" in timm.list_models("lesa_*")
    assert timm.models.get_pretrained_cfg("lesa_resnet50").input_size == (3, 224, 224)


def test_unknown_model_lists_the_names():
    with pytest.raises(ValueError, match="unknown model 'lesa_resnet51'.*Did you mean.*lesa_resnet50"):
        create_model("lesa_resnet51")
    assert "static_lesa_resnet50" in list_models()


def test_pretrained_true_explains():
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_model("lesa_resnet50", pretrained=True)


def test_model_options_are_checked():
    with pytest.raises(ConfigError, match="num_classes must be >= 0"):
        create_model("resnet_tiny", num_classes=-1)
    assert isinstance(create_model("resnet_tiny", num_classes=0).fc, torch.nn.Identity)  # 0: no head
    with pytest.raises(ConfigError, match="aa_resnet_tiny does not use the layer option"):
        create_model("aa_resnet_tiny", unary="deform")
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("lesa_resnet51")


def test_models_pattern_without_a_match(capsys):
    assert main(["models", "lesa_vit*"]) == 2  # bad input
    assert "no model matches 'lesa_vit*'" in capsys.readouterr().err
    assert main(["models", "lesa_*"]) == 0
    assert capsys.readouterr().out.split() == [n for n in list_models() if n.startswith("lesa_")]
