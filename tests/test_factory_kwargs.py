"""torch.nn's factory arguments: every layer and model builder takes ``device=`` and ``dtype=`` and creates its
parameters and buffers there and so, without a copy afterwards."""
import pytest
import torch
from helpers import randomise

from lesa import AttentionAugmentedConv2d, LESA2d, SelfAttention2d
from lesa.detection import build_detector
from lesa.errors import ConfigError
from lesa.layers import BinaryAttention2d
from lesa.layers.fusion import DynamicFusionGate
from lesa.layers.rel_pos import FlatRelPosEmbed, RelPosEmbed2d
from lesa.layers.unary import UnaryConv2d
from lesa.models import create_model

LAYERS = {
    "lesa": lambda **kw: LESA2d(16, 16, heads=4, feature_size=5, **kw),
    "lesa_rel2d_static": lambda **kw: LESA2d(16, 16, heads=4, pos_embed="rel2d", fusion="static", feature_size=5, **kw),
    "lesa_deform": lambda **kw: LESA2d(16, 16, heads=4, unary="deform", feature_size=5, **kw),
    "sa": lambda **kw: SelfAttention2d(16, 16, heads=4, feature_size=5, **kw),
    "aa": lambda **kw: AttentionAugmentedConv2d(16, 32, heads=4, feature_size=5, **kw),
    "binary": lambda **kw: BinaryAttention2d(16, 16, heads=4, feature_size=5, **kw),
    "unary": lambda **kw: UnaryConv2d(16, 16, heads=4, **kw),
    "fusion": lambda **kw: DynamicFusionGate(16, **kw),
    "flat_table": lambda **kw: FlatRelPosEmbed(4, 8, 5, **kw),
    "rel2d_table": lambda **kw: RelPosEmbed2d(4, 5, **kw),
}


def tensors(module):
    return [*module.parameters(), *module.buffers()]


@pytest.fixture
def no_copy(monkeypatch):
    """Building must create every tensor in place: any Module.to / _apply (a copy) fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was copied after it was built")
    monkeypatch.setattr(torch.nn.Module, "_apply", refuse)


@pytest.mark.parametrize("name", LAYERS)
def test_a_layer_is_built_on_meta_and_in_float64_without_a_copy(name, no_copy):
    meta = LAYERS[name](device="meta")
    assert tensors(meta) and all(t.device.type == "meta" for t in tensors(meta))
    wide = LAYERS[name](dtype=torch.float64)
    floats = [t for t in tensors(wide) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)
    counts = [t for t in tensors(wide) if not t.is_floating_point()]
    assert all(t.dtype == torch.int64 for t in counts)  # BatchNorm's num_batches_tracked keeps its dtype
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("name", ["lesa", "sa", "aa"])
def test_a_layer_built_in_float64_computes_as_one_cast_to_float64(name):
    """The same weights give bit-identical outputs whether the layer was built in float64 or cast to it."""
    torch.manual_seed(0)
    cast = LAYERS[name]().double()
    randomise(cast)
    built = LAYERS[name](dtype=torch.float64)
    built.load_state_dict(cast.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(cast, mode)(), getattr(built, mode)()
        assert torch.equal(built(x), cast(x))


@pytest.mark.parametrize("name", ["lesa_resnet_tiny", "sa_resnet_tiny", "aa_resnet_tiny", "static_lesa_resnet_tiny",
                                  "resnet_tiny"])
def test_a_model_is_built_on_meta_and_in_float64_without_a_copy(name, no_copy):
    meta = create_model(name, device="meta")
    assert all(t.device.type == "meta" for t in tensors(meta))
    wide = create_model(name, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in tensors(wide) if t.is_floating_point())


def test_the_paper_model_on_meta_allocates_nothing(no_copy):
    model = create_model("lesa_resnet50", device="meta")
    assert sum(t.numel() for t in model.parameters()) > 20e6
    assert all(t.device.type == "meta" for t in tensors(model))
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def test_a_detector_is_built_on_meta_and_in_float64():
    meta = build_detector("maskrcnn", "lesa_resnet_tiny", 3, min_size=64, max_size=96, device="meta")
    assert all(t.device.type == "meta" for t in tensors(meta))
    wide = build_detector("htc", "lesa_resnet_tiny", 3, min_size=64, max_size=96, semantic_classes=4,
                          dtype=torch.float64).eval()
    assert all(t.dtype == torch.float64 for t in tensors(wide) if t.is_floating_point())
    assert wide([torch.rand(3, 64, 80, dtype=torch.float64)])[0]["boxes"].dtype == torch.float64


def test_a_dtype_that_is_not_floating_point_is_one_config_error():
    with pytest.raises(ConfigError, match=r"dtype=torch.int64: .*floating-point"):
        LAYERS["lesa"](dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"dtype='float65': .*or its name"):
        LAYERS["lesa"](dtype="float65")
    assert torch.get_default_dtype() == torch.float32


def test_a_dtype_may_be_named_as_configs_name_it():
    for name in ("float64", "torch.float64"):
        assert all(t.dtype == torch.float64 for t in tensors(LAYERS["lesa"](dtype=name)) if t.is_floating_point())


@pytest.mark.parametrize("device,message", [
    ("gpu", "not a device type torch knows"),
    ("cuda:99" if torch.cuda.is_available() else "cuda", "cannot be used here"),
    (-1, "cannot be used here"),
])
def test_a_device_this_machine_lacks_is_one_config_error(device, message):
    with pytest.raises(ConfigError, match=message) as raised:
        create_model("lesa_resnet_tiny", device=device)
    assert len(str(raised.value).splitlines()) == 1


def test_the_default_dtype_is_restored_when_building_fails():
    with pytest.raises(ConfigError, match=r"odd out_channels fits no head count: choose an even one \(e.g. 16\)"):
        LESA2d(16, 15, heads=4, dtype=torch.float64)  # channels not divisible by the heads
    assert torch.get_default_dtype() == torch.float32


def test_amps_short_dtype_names_are_accepted():
    assert next(create_model("lesa_resnet_tiny", dtype="bf16").parameters()).dtype == torch.bfloat16


def test_a_meta_model_with_a_new_classifier_is_whole_after_loading():
    model = create_model("lesa_resnet_tiny", device="meta", num_classes=5,
                         checkpoint_path="lesa_resnet_tiny.fashion_mnist")
    assert not any(t.is_meta for t in tensors(model))
    assert model.eval()(torch.randn(1, 3, 28, 28)).shape == (1, 5)
