"""The timm contract, at CPU sizes: lesa models built by timm's builder behave as timm's ResNet does
(pretrained_cfg, features_only, forward_intermediates, pruning, grad checkpointing, heads), and TorchScript
and torch.fx graphs of them compute what eager PyTorch does."""
import copy

import pytest
import torch
from helpers import calibrated, close, image

import lesa
from lesa.errors import ConfigError
from lesa.models import ResNet, attention_layers

timm = pytest.importorskip("timm")

TINY = ["lesa_resnet_tiny", "sa_resnet_tiny", "aa_resnet_tiny", "static_lesa_resnet_tiny", "resnet_tiny"]
CHANNELS, REDUCTIONS = [64, 128, 256, 512], [1, 2, 4, 4]  # the stages of the attention tiny models
SIZE = 16  # inputs of most tests (the tiny models' 32 px default where the cfg is the point)


def build(name="lesa_resnet_tiny", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


def small(name="lesa_resnet_tiny", **kwargs):
    return build(name, img_size=SIZE, **kwargs)


# -- the builder and the cfg --------------------------------------------------------------------------
def test_built_by_timms_builder_with_generated_cfgs():
    model = build()
    assert isinstance(model, ResNet)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["architecture"] == "lesa_resnet_tiny"
    assert cfg["input_size"] == (3, 32, 32) and cfg["pool_size"] == (8, 8) and cfg["fixed_input_size"]
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 1.0
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    # the one place the defaults come from
    for key, value in lesa.models.default_cfg("lesa_resnet_tiny").items():
        assert cfg[key] == value, key
    assert model.num_features == model.head_hidden_size == 512 and model.num_classes == 10
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 32, 32) and data["mean"] == (0.5, 0.5, 0.5)


def test_cfg_follows_the_model_arguments():
    assert build("lesa_resnet50", pos_embed="rel2d", img_size=64, num_classes=0).pretrained_cfg["fixed_input_size"] \
        is False
    model = build(pos_embed="flat", img_size=48, num_classes=3)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48) and model.pretrained_cfg["pool_size"] == (12, 12)
    assert model(image(1, 48)).shape == (1, 3)
    assert timm.models.get_pretrained_cfg("lesa_resnet50").pool_size == (14, 14)
    assert timm.models.get_pretrained_cfg("resnet_tiny").pool_size == (4, 4)  # conv: stage 4 at stride 2
    # timm passes the cfg's fixed size to 'flat' models, and an explicit one wins
    assert build("sa_resnet_tiny").layer4[0].conv2.binary.rel_pos.feature_size == (8, 8)
    with pytest.raises(ConfigError, match="lesa ships weights .* only, not lesa_resnet50"):
        timm.create_model("lesa_resnet50", pretrained=True)
    with pytest.raises(ConfigError, match="does not use the layer option"):
        timm.create_model("lesa_resnet_tiny", drop_path_rate=0.1)


# -- features -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("feature_cls", [None, "getter", "hook", "fx"])
def test_features_only_gives_the_chosen_stages(feature_cls):
    extra = {} if feature_cls is None else dict(feature_cls=feature_cls)
    features = small(features_only=True, out_indices=(1, 3), **extra)
    model = small()
    assert features.feature_info.channels() == [CHANNELS[1], CHANNELS[3]]
    assert features.feature_info.reduction() == [REDUCTIONS[1], REDUCTIONS[3]]
    features.eval(), model.eval()
    x = image()
    with torch.no_grad():
        outs = features(x)
        outs = list(outs.values()) if isinstance(outs, dict) else outs
        expected = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert len(outs) == 2
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref)
    assert len(small(features_only=True).feature_info) == 4  # default: all four stages


def test_forward_intermediates_contract():
    model = calibrated(small(pos_embed="rel2d", num_classes=5))
    x = image()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == CHANNELS
        assert [SIZE // t.shape[-1] for t in inter] == REDUCTIONS
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two, inter[2:])
        ends = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(ends, [inter[0], inter[3]])
        early, (stage1,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early, inter[1])
        torch.testing.assert_close(stage1, inter[1])
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc, [t.permute(0, 2, 3, 1) for t in inter])
        torch.testing.assert_close(model.forward_intermediates(x, norm=True)[1], inter)  # a ResNet has no norm
        # prune what the chosen levels do not need (and the head), as timm's feature getter does
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.layer3) == len(model.layer4) == 0 and model.num_classes == 0
        torch.testing.assert_close(model.forward_intermediates(x, indices=[0, 1], intermediates_only=True),
                                   inter[:2])
    with pytest.raises(ConfigError, match="feature index 4 is out of range"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ConfigError, match="must be in 1..4"):
        model.forward_intermediates(x, indices=5)
    with pytest.raises(ConfigError, match="output_fmt='NLC'"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_detection_backbone_uses_the_intermediates():
    from lesa.detection import build_backbone

    backbone = build_backbone("lesa_resnet_tiny", table_size=64).eval()
    x = image(1, 64)
    with torch.no_grad():
        feats = backbone(x)
        stages = backbone.body.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(backbone.fpn(dict((str(i), f) for i, f in enumerate(stages))), feats)
    assert [f.shape[-1] for f in stages] == [16, 8, 4, 2]  # strides 4-32


# -- grad checkpointing and the head ------------------------------------------------------------------
def test_grad_checkpointing_changes_nothing_but_memory():
    model = small(pos_embed="rel2d", impl="fused").double()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing()
    x = image().double()
    for m in (model, checkpointed):
        m.train()
        m(x).logsumexp(1).sum().backward()
    for (name, a), b in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, a), b in zip(model.named_buffers(), checkpointed.buffers()):  # BN statistics counted once
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    assert model.group_matcher()["blocks"] and model.group_matcher(coarse=True)["stem"]


def test_heads_and_pooling():
    model = small(num_classes=7).eval()
    x = image()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(pre, feats.mean((2, 3)))  # average pooling
        torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pre))
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), feats)  # neither pooled nor classified
        model.reset_classifier(4, "max")
        assert model.num_classes == 4
        torch.testing.assert_close(model(x), model.get_classifier()(feats.amax((2, 3))))  # max pooling, 4 classes
        unpooled = small(num_classes=0, global_pool="").eval()  # built without head and pooling
        unpooled.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
        torch.testing.assert_close(unpooled(x), feats)
    with pytest.raises(ConfigError, match="global_pool='token'"):
        model.reset_classifier(0, "token")


# -- TorchScript and torch.fx --------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's deprecation notice
@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in TINY] + [
    ("lesa_resnet_tiny", dict(pos_embed="rel2d")),
    ("lesa_resnet_tiny", dict(pos_embed="rel2d", impl="fused")),
    ("lesa_resnet_tiny", dict(pos_embed="flat", impl="fused")),
])
def test_torchscript_and_fx_compute_the_eager_function(name, kwargs):
    model = calibrated(small(name, **kwargs))
    x = image()
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        traced = torch.fx.symbolic_trace(model)
        # graphs take the reference path; eager takes it too for 'rel2d' on small maps and for the models
        # without attention, while 'flat' attention under 'auto' runs the dense kernel: the same function
        eager_reference = kwargs.get("impl") != "fused" and (
            kwargs.get("pos_embed") == "rel2d" or name in ("aa_resnet_tiny", "resnet_tiny"))
        for graph in (scripted, traced):
            if eager_reference:
                torch.testing.assert_close(graph(x), expected, rtol=0, atol=0)
            else:
                close(graph(x), expected)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_graphs_run_at_other_sizes_and_train():
    model = calibrated(small(pos_embed="rel2d"))
    scripted, traced = torch.jit.script(model), torch.fx.symbolic_trace(model)
    x = image(1, 24)  # rel2d: any size (tables interpolated inside the graph)
    with torch.no_grad():
        for graph in (scripted, traced):
            torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
    # training mode: outputs, gradients and BN statistics of the graph module are eager's (bitwise, with
    # eager on the reference path the graph runs)
    model = small("sa_resnet_tiny", impl="reference").train()
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    x = image()
    traced(x).sum().backward()
    eager(x).sum().backward()
    grads, buffers = dict(traced.named_parameters()), dict(traced.named_buffers())  # the graph's own order
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=0, atol=0, msg=name)
    for name, b in eager.named_buffers():
        torch.testing.assert_close(buffers[name], b, rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_graph_input_checks_name_the_fix():
    model = small().eval()  # 'flat': 16x16 inputs only
    wrong_size = image(1, 24)
    with pytest.raises(ConfigError, match="built for 4x4 feature maps but got 6x6"):
        model(wrong_size)  # eager: the ConfigError as before
    for graph in (torch.jit.script(model), torch.fx.symbolic_trace(model)):
        with pytest.raises(Exception, match="build the model for this input size"):
            graph(wrong_size)
    layer = attention_layers(model)[0][1]
    for graph in (torch.jit.script(layer), torch.fx.symbolic_trace(layer)):
        with pytest.raises(Exception, match=r"pass an \(N, 64, H, W\) input"):
            graph(torch.randn(1, 32, 4, 4))
