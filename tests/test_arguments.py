"""Every public builder checks its arguments and every layer its input, with one-line errors naming what is
wrong (lesa.layers.checks); a zero-size batch runs on every path and leaves every BatchNorm's statistics as
nn.BatchNorm2d leaves them."""
import copy

import pytest
import torch
from torch import nn

from lesa import AttentionAugmentedConv2d, BinaryAttention2d, LESA2d, SelfAttention2d, create_model
from lesa.detection import build_detector
from lesa.errors import ConfigError, InputError
from lesa.layers import DeformConv2dPack, DynamicFusionGate, FlatRelPosEmbed, RelPosEmbed2d, UnaryConv2d

C, HEADS, SIZE = 16, 4, 6  # tiny layers: the whole file runs in seconds on one core


def lesa(**kw):
    return LESA2d(C, C, **{"heads": HEADS, "feature_size": SIZE, **kw})


BAD_ARGUMENTS = [
    # (what is built, the argument's name as written, the value as the message shows it)
    (lambda: create_model("lesa_resnet_tiny", in_chans=0), "in_chans", "0"),
    (lambda: create_model("lesa_resnet_tiny", in_chans=3.0), "in_chans", "3.0"),
    (lambda: lesa(feature_size=0), "feature_size", "0"),
    (lambda: lesa(feature_size=-3), "feature_size", "-3"),
    (lambda: lesa(feature_size=(6, 0)), "feature_size[1]", "0"),
    (lambda: lesa(feature_size=6.0), "feature_size", "6.0"),
    (lambda: lesa(feature_size=(6, 6, 6)), "feature_size", "(6, 6, 6)"),
    (lambda: lesa(heads=4.0), "heads", "4.0"),
    (lambda: lesa(heads=True), "heads", "True"),
    (lambda: lesa(heads=[4]), "heads", "[4]"),
    (lambda: lesa(heads=0), "heads", "0"),
    (lambda: lesa(heads=3), "heads", "6"),  # 16 channels are not divisible by 2 * 3
    (lambda: lesa(stride=0), "stride", "0"),
    (lambda: lesa(stride=2.0), "stride", "2.0"),
    (lambda: lesa(checkpoint="yes"), "checkpoint", "'yes'"),
    (lambda: lesa(fusion="sum"), "fusion", "'sum'"),
    (lambda: lesa(unary="dcn"), "unary", "'dcn'"),
    (lambda: lesa(pos_embed="axial"), "pos_embed", "'axial'"),
    (lambda: lesa(impl="cuda"), "impl", "'cuda'"),
    (lambda: lesa(impl=None), "impl", "None"),
    (lambda: LESA2d(0, C, heads=HEADS), "in_channels", "0"),
    (lambda: LESA2d(C, 16.0, heads=HEADS), "out_channels", "16.0"),
    (lambda: SelfAttention2d(C, C, heads=HEADS, stride=-1), "stride", "-1"),
    (lambda: SelfAttention2d(C, C, heads=2.5), "heads", "2.5"),
    (lambda: BinaryAttention2d(C, C, heads=HEADS, feature_size=True), "feature_size", "True"),
    (lambda: AttentionAugmentedConv2d(C, C, heads=4.0), "heads", "4.0"),
    (lambda: AttentionAugmentedConv2d(C, C, heads=HEADS, dk=6), "dk", "6"),
    (lambda: AttentionAugmentedConv2d(C, C, heads=HEADS, dv=0), "dv", "0"),
    (lambda: AttentionAugmentedConv2d(C, C, heads=HEADS, stride=0), "stride", "0"),
    (lambda: AttentionAugmentedConv2d(C, C, heads=HEADS, impl="flash"), "impl", "'flash'"),
    (lambda: UnaryConv2d(C, C, heads=3), "heads", "3"),
    (lambda: UnaryConv2d(C, C, heads=HEADS, deform=1), "deform", "1"),
    (lambda: DeformConv2dPack(C, C, groups=3), "groups", "3"),
    (lambda: DeformConv2dPack(C, C, padding=-1), "padding", "-1"),
    (lambda: DeformConv2dPack(C, C, kernel_size=3.0), "kernel_size", "3.0"),
    (lambda: DynamicFusionGate(0), "channels", "0"),
    (lambda: FlatRelPosEmbed(2, 4, feature_size=0), "feature_size", "0"),
    (lambda: RelPosEmbed2d(2.0, feature_size=SIZE), "dim", "2.0"),
    (lambda: create_model("lesa_resnet_tiny", heads=4.0), "heads", "4.0"),
    (lambda: create_model("lesa_resnet_tiny", heads=True), "heads", "True"),
    (lambda: create_model("lesa_resnet_tiny", heads=[4]), "heads", "[4]"),
    (lambda: create_model("lesa_resnet_tiny", drop_rate=2.5), "drop_rate", "2.5"),
    (lambda: create_model("lesa_resnet_tiny", drop_rate=1.0), "drop_rate", "1.0"),
    (lambda: create_model("lesa_resnet_tiny", drop_rate="0.1"), "drop_rate", "'0.1'"),
    (lambda: create_model("lesa_resnet_tiny", num_classes=-1), "num_classes", "-1"),
    (lambda: create_model("lesa_resnet_tiny", num_classes=10.0), "num_classes", "10.0"),
    (lambda: create_model("lesa_resnet_tiny", img_size=0), "img_size", "0"),
    (lambda: create_model("lesa_resnet_tiny", img_size=32.0), "img_size", "32.0"),
    (lambda: create_model("resnet_tiny", img_size=(32, -1)), "img_size[1]", "-1"),
    (lambda: create_model("lesa_resnet_tiny", last_stride=0), "last_stride", "0"),
    (lambda: create_model("resnet_tiny", dcn_stages=[5]), "dcn_stages[0]", "5"),
    (lambda: create_model("resnet_tiny", dcn_stages=2), "dcn_stages", "2"),
    (lambda: create_model("resnet_tiny", stem="big"), "stem", "'big'"),
    (lambda: create_model("resnet_tiny", global_pool="token"), "global_pool", "'token'"),
    (lambda: create_model("resnet_tiny", zero_init_residual="no"), "zero_init_residual", "'no'"),
    (lambda: create_model("lesa_resnet_tiny", impl="cuda"), "impl", "'cuda'"),
    (lambda: create_model("lesa_resnet_tiny", unary="dcn"), "unary", "'dcn'"),
    (lambda: create_model("sa_resnet_tiny", unary="dcn"), "unary", "'dcn'"),  # accepted, unused: still checked
    (lambda: create_model("aa_resnet_tiny", pos_embed="axial"), "pos_embed", "'axial'"),
    (lambda: create_model("aa_resnet_tiny", checkpoint="yes"), "checkpoint", "'yes'"),
    (lambda: create_model(["lesa_resnet_tiny"]), "model name", "['lesa_resnet_tiny']"),
    (lambda: build_detector("yolo", "lesa_resnet_tiny", 3), "kind", "'yolo'"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 1), "num_classes", "1"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3.0), "num_classes", "3.0"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3, min_size=0), "min_size", "0"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3, trainable_layers=6), "trainable_layers", "6"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3, impl="cuda"), "impl", "'cuda'"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3, pos_init="zero"), "pos_init", "'zero'"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3, dcn_stages=(0,)), "dcn_stages[0]", "0"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3, checkpoint=1), "checkpoint", "1"),
    (lambda: build_detector("htc", "lesa_resnet_tiny", 3, train_scales=[(1.0, 640)]), "train_scales[0]",
     "(1.0, 640)"),
]


@pytest.mark.parametrize("build, name, value", BAD_ARGUMENTS)
def test_a_bad_argument_is_one_line_naming_it(build, name, value):
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert not isinstance(info.value, InputError)  # an argument, not an input
    assert "\n" not in message
    assert name in message and value in message, message


def test_the_messages_name_the_fix():
    with pytest.raises(ConfigError, match=r"heads must be an int, got float 4\.0: pass heads=4$"):
        lesa(heads=4.0)
    with pytest.raises(ConfigError, match="pass heads=4, not a sequence"):
        lesa(heads=[4])
    with pytest.raises(ConfigError, match=r"Choose heads among \[1, 2, 4, 8\]"):
        lesa(heads=3)
    with pytest.raises(ConfigError, match=r"pos_embed='axial' is not supported; choose one of 'flat', 'rel2d'"):
        lesa(pos_embed="axial")
    with pytest.raises(ConfigError, match=r"drop_rate must be in \[0\.0, 1\.0\), got 2\.5"):
        create_model("lesa_resnet_tiny", drop_rate=2.5)


def test_good_arguments_are_accepted_as_given():
    import numpy as np

    layer = lesa(heads=np.int64(2), feature_size=(6, 4), stride=2)  # NumPy ints are ints; a size may be a pair
    assert layer.binary.heads == 2 and layer.binary.rel_pos.feature_size == (6, 4)
    assert layer(torch.randn(1, C, 6, 4)).shape == (1, C, 3, 2)
    model = create_model("lesa_resnet_tiny", drop_rate=0, num_classes=0, img_size=(32, 24), heads=4)
    assert model(torch.randn(1, 3, 32, 24)).shape == (1, model.num_features)


# -- forward inputs --------------------------------------------------------------------------------------------
LAYERS = {
    "LESA2d": lambda: lesa(pos_embed="rel2d"),
    "SelfAttention2d": lambda: SelfAttention2d(C, C, heads=HEADS, pos_embed="rel2d", feature_size=SIZE),
    "AttentionAugmentedConv2d": lambda: AttentionAugmentedConv2d(C, C, heads=HEADS, feature_size=SIZE),
    "BinaryAttention2d": lambda: BinaryAttention2d(C, C, heads=HEADS, pos_embed="rel2d", feature_size=SIZE),
    "UnaryConv2d": lambda: UnaryConv2d(C, C, heads=HEADS),
    "DeformConv2dPack": lambda: DeformConv2dPack(C, C),
    "ResNet": lambda: create_model("lesa_resnet_tiny", pos_embed="rel2d", in_chans=C),
}


def refused(layer: nn.Module, x: torch.Tensor) -> str:
    with pytest.raises(InputError) as info:
        layer(x)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", list(LAYERS))
def test_inputs_of_another_dtype_are_refused_naming_both(name):
    layer = LAYERS[name]()
    message = refused(layer, torch.randn(2, C, SIZE, SIZE, dtype=torch.float64))
    assert name in message and "torch.float64" in message and "torch.float32" in message
    assert "x.to(torch.float32)" in message and "model.double()" in message
    message = refused(layer, torch.randint(0, 255, (2, C, SIZE, SIZE), dtype=torch.uint8))
    assert "torch.uint8" in message and "x.to(torch.float32)" in message
    assert layer.double()(torch.randn(2, C, SIZE, SIZE, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("name", list(LAYERS))
def test_inputs_of_another_shape_or_device_are_refused(name):
    layer = LAYERS[name]()
    arg = "in_chans" if name == "ResNet" else "in_channels"
    assert f"built with {arg}={C} but the input has 8 channels" in refused(layer, torch.randn(2, 8, SIZE, SIZE))
    assert "4-D (N, C, H, W)" in refused(layer, torch.randn(C, SIZE, SIZE))
    for height, width in ((0, 0), (0, SIZE), (SIZE, 0)):
        assert "H and W must be >= 1" in refused(layer, torch.randn(2, C, height, width))
    message = refused(layer.to("meta"), torch.randn(2, C, SIZE, SIZE))  # a second device without a GPU
    assert "on cpu" in message and "on meta" in message


def test_autocast_inputs_of_the_autocast_dtype_are_taken():
    layer = lesa()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, C, SIZE, SIZE, dtype=torch.bfloat16)).shape == (2, C, SIZE, SIZE)


# -- zero-size batches -----------------------------------------------------------------------------------------
def empty_batch_counts() -> int:
    """What one empty training batch adds to nn.BatchNorm2d's num_batches_tracked (its running mean and
    variance stay as they were: asserted here, so that the comparison below is with torch's actual rule)."""
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    bn(torch.randn(0, 3, 2, 2))
    assert torch.equal(bn.running_mean, torch.full((3,), 0.5)) and torch.equal(bn.running_var, torch.ones(3))
    return int(bn.num_batches_tracked)


def assert_buffers_as_batch_norm_leaves_them(module: nn.Module, before: dict, training: bool) -> None:
    counted = empty_batch_counts() if training else 0
    for name, buf in module.named_buffers():
        expected = before[name] + counted if name.endswith("num_batches_tracked") else before[name]
        assert torch.equal(buf, expected), name


def empty_batch_step(module: nn.Module, x: torch.Tensor) -> None:
    """A training step on ``x[:0]`` between two eval forwards of ``x``, which must agree exactly."""
    module.eval()
    with torch.no_grad():
        reference = module(x)
    before = {name: buf.clone() for name, buf in module.named_buffers()}
    module.train()
    empty = x[:0].clone().requires_grad_()
    out = module(empty)
    assert out.shape == (0, *reference.shape[1:])
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert_buffers_as_batch_norm_leaves_them(module, before, training=True)
    module.eval()
    with torch.no_grad():
        after = module(x)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, reference, rtol=0, atol=0)


ATTENTION = {
    "LESA2d": lambda **kw: LESA2d(C, C, heads=HEADS, **kw),
    "SelfAttention2d": lambda **kw: SelfAttention2d(C, C, heads=HEADS, **kw),
    "AttentionAugmentedConv2d": lambda pos_embed, **kw: AttentionAugmentedConv2d(C, C, heads=HEADS, **kw),
}
ZERO_BATCH_CASES = [(layer, impl, pos_embed, SIZE) for layer in ATTENTION for impl in ("reference", "fused", "auto")
                    for pos_embed in ("flat", "rel2d") if layer != "AttentionAugmentedConv2d" or pos_embed == "rel2d"]
ZERO_BATCH_CASES += [("LESA2d", "fused", "rel2d", 18)]  # > 16 rows: the key-row-split kernel on the CPU


@pytest.mark.parametrize("layer, impl, pos_embed, size", ZERO_BATCH_CASES)
def test_an_empty_batch_leaves_every_batch_norm_as_nn_batchnorm2d_does(layer, impl, pos_embed, size):
    torch.manual_seed(0)
    module = ATTENTION[layer](pos_embed=pos_embed, feature_size=size, impl=impl)
    module.train()(torch.randn(4, C, size, size))  # running statistics that differ from the initial ones
    empty_batch_step(module, torch.randn(2, C, size, size))


def test_an_empty_batch_through_the_fused_logit_moments_matches_the_reference_path():
    torch.manual_seed(0)
    fused = lesa(impl="fused")
    reference = copy.deepcopy(fused)
    reference.binary.impl = "reference"
    empty = torch.randn(0, C, SIZE, SIZE)
    fused.train()(empty)
    reference.train()(empty)
    for (name, a), (_, b) in zip(fused.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name, kw", [
    ("lesa_resnet_tiny", {}), ("lesa_resnet_tiny", dict(impl="fused")), ("lesa_resnet_tiny", dict(impl="reference")),
    ("lesa_resnet_tiny", dict(pos_embed="rel2d", impl="fused")), ("static_lesa_resnet_tiny", {}),
    ("sa_resnet_tiny", dict(impl="fused")), ("aa_resnet_tiny", {}), ("resnet_tiny", {}),
])
def test_models_take_empty_batches_in_training_and_eval(name, kw):
    torch.manual_seed(0)
    model = create_model(name, **kw)
    x = torch.randn(2, 3, 32, 32)
    empty_batch_step(model, x)
    before = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        assert model.eval()(x[:0]).shape == (0, 10)
    assert_buffers_as_batch_norm_leaves_them(model, before, training=False)
