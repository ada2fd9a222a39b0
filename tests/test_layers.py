"""LESA2d / SelfAttention2d / AttentionAugmentedConv2d against an independent float64 computation (outputs, BN
statistics, gradients), and how the layers refuse bad arguments, inputs and allocations."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import close, randomise
from naive_lesa import binary_term, lesa

from lesa import AttentionAugmentedConv2d, LESA2d, SelfAttention2d
from lesa.errors import ConfigError
from lesa.layers import BinaryAttention2d


def make_layer(cls=LESA2d, channels=32, heads=4, size=5, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    layer = cls(channels, channels, heads=heads, feature_size=size, **kw).to(dtype)
    randomise(layer)
    return layer


def bn_stats(module):
    return {
        n[: -len(".running_mean")]: (m_buf, dict(module.named_buffers())[n.replace("mean", "var")])
        for n, m_buf in module.named_buffers()
        if n.endswith("running_mean")
    }


@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fusion", ["dynamic", "static"])
def test_lesa_matches_naive_float64(pos_embed, impl, training, fusion):
    layer = make_layer(pos_embed=pos_embed, impl=impl, fusion=fusion).train(training)
    expected_layer = copy.deepcopy(layer)
    x = torch.randn(3, 32, 5, 5, dtype=torch.float64)
    out = layer(x)
    expected, stats = lesa(expected_layer, x, training)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    ours = bn_stats(layer)
    for name, (mean, var) in stats.items():
        torch.testing.assert_close(ours[name][0], mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[name][1], var, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_self_attention_is_the_binary_term(pos_embed, impl):
    layer = make_layer(SelfAttention2d, pos_embed=pos_embed, impl=impl).train()
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    expected, _ = binary_term(copy.deepcopy(layer.binary), x, True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_non_square_rel2d_matches_naive():
    layer = make_layer(pos_embed="rel2d", size=(4, 6), impl="reference").train()
    x = torch.randn(2, 32, 4, 6, dtype=torch.float64)
    expected, _ = lesa(copy.deepcopy(layer), x, True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_stride_pools_the_output():
    layer = make_layer(stride=2, pos_embed="rel2d", size=6).eval()
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    expected, _ = lesa(copy.deepcopy(layer), x, False)
    out = layer(x)
    assert out.shape == (2, 32, 3, 3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
def test_gradcheck(impl, pos_embed):
    """Analytic gradients of the whole layer (train-mode BN included) against finite differences."""
    layer = make_layer(channels=8, heads=2, size=3, impl=impl, pos_embed=pos_embed).train()
    for m in layer.modules():  # keep running stats fixed across gradcheck's many evaluations
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [layer.binary.qkv.weight, layer.binary.bn_logits.weight, next(layer.binary.rel_pos.parameters())]

    def fn(inp, *ps):
        return layer(inp)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def test_attention_augmented_conv_matches_naive():
    torch.manual_seed(0)
    layer = AttentionAugmentedConv2d(32, 40, heads=4, feature_size=5, dk=8, dv=8, impl="reference").double()
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    conv = F.conv2d(x, layer.conv.weight, padding=1)
    qkv = F.conv2d(x, layer.qkv.weight).reshape(2, 4, 6, 25)
    q, k, v = qkv[:, :, :2] * 2**-0.5, qkv[:, :, 2:4], qkv[:, :, 4:]
    ys, xs = torch.arange(25) // 5, torch.arange(25) % 5
    rh = layer.rel_pos.height[ys[None, :] - ys[:, None] + 4]
    rw = layer.rel_pos.width[xs[None, :] - xs[:, None] + 4]
    logits = torch.einsum("ngci,ngcj->ngij", q, k) + torch.einsum("ngci,ijc->ngij", q, rh + rw)
    attn = torch.einsum("ngij,ngcj->ngci", logits.softmax(-1), v).reshape(2, 8, 5, 5)
    expected = torch.cat([conv, F.conv2d(attn, layer.attn_out.weight)], 1)
    torch.testing.assert_close(layer(x), expected)
    layer.impl = "fused"
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).shape == (2, 40, 5, 5)


def test_checkpointing_keeps_outputs_grads_and_bn_stats():
    plain = make_layer(dtype=torch.float32, impl="fused", pos_embed="flat").train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    x = torch.randn(2, 32, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), ckpt(xb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(a, b, msg=f"{name} was updated twice under checkpointing")


def test_deformable_unary_starts_as_the_plain_conv():
    conv = make_layer(pos_embed="rel2d").eval()
    deform = make_layer(pos_embed="rel2d", unary="deform").eval()
    deform.unary.conv.weight.data.copy_(conv.unary.conv.weight)
    state = {k: v for k, v in conv.state_dict().items()}
    missing = deform.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == ["unary.conv.conv_offset.bias", "unary.conv.conv_offset.weight"]
    x = torch.randn(1, 32, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(deform(x), conv(x))


@pytest.mark.parametrize("impl", ["auto", "fused"])
@pytest.mark.parametrize("cls", [LESA2d, SelfAttention2d])
def test_gradients_match_autograd_through_the_naive_computation(cls, impl):
    """A training step at the paper's head count (8 heads, 'rel2d', 7x7): the output, the input's gradient and
    every parameter's gradient equal autograd's through the naive float64 computation."""
    layer = make_layer(cls, channels=64, heads=8, size=7, pos_embed="rel2d", impl=impl).train()
    naive = copy.deepcopy(layer)
    x = torch.randn(2, 64, 7, 7, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xa)
    expected, _ = lesa(naive, xb, True) if cls is LESA2d else binary_term(naive.binary, xb, True)
    assert out.shape == (2, 64, 7, 7)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    for (name, p), q in zip(layer.named_parameters(), naive.parameters()):
        if name.endswith("bn_logits.bias"):  # softmax is shift invariant: zero up to rounding
            assert p.grad is None or float(p.grad.abs().max()) < 1e-9, name
            continue
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_bad_heads_raise_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 2\\*heads"):
        LESA2d(64, 60, heads=8)
    with pytest.raises(ValueError, match="in_channels=60 must be divisible by heads=8"):
        LESA2d(60, 64, heads=8)


def test_wrong_input_channels():
    layer = LESA2d(32, 32, heads=4, feature_size=5)
    with pytest.raises(ValueError, match="in_channels=32 but the input has 16 channels"):
        layer(torch.randn(1, 16, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(16, 5, 5))


def test_flat_embedding_rejects_another_size_and_names_the_fix():
    layer = SelfAttention2d(32, 32, heads=4, feature_size=5, pos_embed="flat")
    with pytest.raises(ValueError, match="built for 5x5 feature maps but got 6x6.*rel2d"):
        layer(torch.randn(1, 32, 6, 6))


def test_bad_options():
    with pytest.raises(ValueError, match="pos_embed='axial' is not supported"):
        LESA2d(32, 32, heads=4, pos_embed="axial")
    with pytest.raises(ValueError, match="impl='cuda'"):
        BinaryAttention2d(32, 32, heads=4, impl="cuda")
    with pytest.raises(ValueError, match="fusion='sum'"):
        LESA2d(32, 32, heads=4, fusion="sum")


def test_the_reference_path_refuses_what_cannot_be_allocated(monkeypatch):
    import lesa.layers.guards as guards

    layer = LESA2d(32, 32, heads=4, pos_embed="rel2d", feature_size=16, impl="reference")
    x = torch.randn(2, 32, 16, 16)
    expected = copy.deepcopy(layer)(x)  # the reference path where the memory is there
    monkeypatch.setattr(guards, "free_memory", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ConfigError, match=r"impl='reference' would materialise 2x8x256x256 .*use impl='fused'"):
        layer(x)
    layer.binary.impl = "fused"
    close(layer(x), expected)  # the same function, without the (HW)^2 tensor
