"""impl='fused' computes the same function as impl='reference': outputs, gradients, BN statistics."""
import copy

import pytest
import torch
from helpers import assert_same_step, bn_affines
from naive_lesa import lesa as naive_lesa

import lesa
from lesa import LESA2d, SelfAttention2d
from lesa.layers import flat_attention
from lesa.layers import rel2d_attention as rel2d_module
from lesa.layers.binary import resolve_auto
from lesa.layers.rel2d_attention import (
    ROWS_PER_GROUP,
    KeyRowSplitAttention,
    augment_rel2d,
    rel2d_attention,
    sdpa,
)
from lesa.models import attention_layers, create_model


def pair(cls, dtype, pos_embed, size, block_elems=None, **kw):
    torch.manual_seed(0)
    ref = bn_affines(cls(32, 32, heads=4, pos_embed=pos_embed, feature_size=size, impl="reference", **kw).to(dtype))
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if hasattr(m, "impl"):
            m.impl = "fused"
        if block_elems and hasattr(m, "block_elems"):
            m.block_elems = block_elems
    return ref, fused


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pos_embed,size,block_elems", [
    ("rel2d", (6, 6), None),
    ("rel2d", (5, 7), None),
    ("rel2d", (19, 5), None),  # more key rows than one group of the CPU key-row split
    ("flat", (6, 6), None),
    ("flat", (5, 7), 3 * 4 * 35),  # several query blocks (a block of 3 queries, last one shorter)
])
@pytest.mark.parametrize("cls", [LESA2d, SelfAttention2d])
def test_fused_equals_reference(cls, pos_embed, size, block_elems, dtype):
    ref, fused = pair(cls, dtype, pos_embed, size, block_elems)
    x = torch.randn(3, 32, *size, dtype=dtype) * 1.5 + 0.3
    for _ in range(2):  # two training steps: running stats accumulate identically
        assert_same_step(ref.train(), fused.train(), x, dtype)
    assert_same_step(ref.eval(), fused.eval(), x, dtype)


@pytest.mark.parametrize("block_elems,blocks", [(None, 1), (1, 35), (4 * 12 * 2 * 35, 9)])
def test_dense_flat_kernel_equals_reference(block_elems, blocks, monkeypatch):
    """'auto' on a small 'flat' map runs FlatDenseAttention (all logits at once, hand-written backward),
    in one row block, in blocks of one query/key (the table windows and skewed views at every offset), or
    in blocks of 4 rows and a last one of 3 (the reused zeroed buffers of ``Unskewed``)."""
    if block_elems:
        monkeypatch.setattr(rel2d_module, "DENSE_BLOCK_ELEMS", block_elems)
    dtype = torch.float64
    ref, dense = pair(LESA2d, dtype, "flat", (5, 7))
    dense.binary.impl = "auto"
    assert resolve_auto("flat", 35) == "dense"
    calls = []
    monkeypatch.setattr(flat_attention.FlatDenseAttention, "forward",
                        lambda ctx, *a, f=flat_attention.FlatDenseAttention.forward: calls.append(1) or f(ctx, *a))
    x = torch.randn(3, 32, 5, 7, dtype=dtype) * 1.5 + 0.3
    for _ in range(2):
        assert_same_step(ref.train(), dense.train(), x, dtype)
    assert_same_step(ref.eval(), dense.eval(), x, dtype)
    assert len(calls) == 3
    assert len(flat_attention.dense_blocks(35, 12)) == blocks


@pytest.mark.parametrize("height,width", [(ROWS_PER_GROUP + 3, 4), (2 * ROWS_PER_GROUP, 3), (3, 5)])
def test_rel2d_attention_kernels_equal_the_softmax(height, width):
    """The CPU key-row split and the single SDPA call (the CUDA path) against the softmax, float64."""
    gen = torch.Generator().manual_seed(height)
    n, g, d, dv, num = 2, 3, 5, 7, height * width
    shapes = [(n, g, num, d), (n, g, num, d), (n, g, num, dv), (n, g, num, height), (n, g, num, width)]
    q, k, v, rows, cols = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes)
    logits = q @ k.transpose(-1, -2) + (rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)
    expected = torch.softmax(logits, dim=-1) @ v
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    inputs = (q, k, v, rows, cols)
    want = torch.autograd.grad(expected, inputs, grad)
    dispatched = rel2d_attention(q, k, v, rows, cols)
    assert (type(dispatched.grad_fn).__name__ == "KeyRowSplitAttentionBackward") == (height > ROWS_PER_GROUP)
    for out in (KeyRowSplitAttention.apply(q, k, v, rows, cols), sdpa(*augment_rel2d(q, k, rows, cols), v)):
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        for got, ref in zip(torch.autograd.grad(out, inputs, grad), want):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
def test_cumulative_and_untracked_batch_norm(pos_embed):
    ref, fused = pair(LESA2d, torch.float64, pos_embed, (4, 4))
    for module in (ref, fused):
        module.binary.bn_logits.momentum = None  # cumulative moving average
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    for _ in range(3):
        assert_same_step(ref.train(), fused.train(), x, torch.float64)
    assert int(fused.binary.bn_logits.num_batches_tracked) == 3
    ref, fused = pair(LESA2d, torch.float64, pos_embed, (4, 4))
    for module in (ref, fused):
        bn = module.binary.bn_logits
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    assert_same_step(ref.eval(), fused.eval(), x, torch.float64)  # batch statistics even in eval


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_rel2d_crops_tables_for_smaller_maps_exactly(impl):
    """A layer built for 8x8 maps, run on 5x7, is the layer built for 5x7 with the central offsets."""
    torch.manual_seed(0)
    big = LESA2d(32, 32, heads=4, pos_embed="rel2d", feature_size=8, impl=impl).double().train()
    small = LESA2d(32, 32, heads=4, pos_embed="rel2d", feature_size=(5, 7), impl=impl).double().train()
    sd = big.state_dict()
    sd["binary.rel_pos.height"] = sd["binary.rel_pos.height"][8 - 5 : 8 + 5 - 1]
    sd["binary.rel_pos.width"] = sd["binary.rel_pos.width"][8 - 7 : 8 + 7 - 1]
    small.load_state_dict(sd)
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    expected, _ = naive_lesa(copy.deepcopy(small), x, True)
    torch.testing.assert_close(big(x), expected)


def test_rel2d_interpolates_for_larger_maps():
    ref, fused = pair(LESA2d, torch.float64, "rel2d", (4, 4))
    x = torch.randn(2, 32, 6, 9, dtype=torch.float64)
    assert_same_step(ref.train(), fused.train(), x, torch.float64)
    # offset 0 stays at the centre and the table keeps its end values when stretched
    table = ref.binary.rel_pos.height
    stretched = lesa.layers.resize_rel_table(table, 6)
    assert stretched.shape == (11, table.shape[1])
    torch.testing.assert_close(stretched[5], table[3])


def test_resize_pos_embed_bakes_in_what_runtime_resizing_does():
    torch.manual_seed(0)
    model = create_model("lesa_resnet_tiny", pos_embed="rel2d", impl="fused").eval()
    x = torch.randn(1, 3, 48, 40)
    on_the_fly = model(x)
    sd = lesa.resize_pos_embed(model.state_dict(), (48, 40), old_size=32)
    lesa.resize_pos_embed(model, (48, 40))
    assert model.img_size == (48, 40)
    assert all(m.binary.rel_pos.feature_size == (12, 10) for _, m in attention_layers(model))
    torch.testing.assert_close(model(x), on_the_fly)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    resized = create_model("lesa_resnet_tiny", pos_embed="rel2d", img_size=(48, 40))
    resized.load_state_dict(sd, strict=True)


def test_resize_pos_embed_refuses_flat():
    with pytest.raises(ValueError, match="cannot be resized.*rel2d"):
        lesa.resize_pos_embed(create_model("lesa_resnet_tiny"), 64)
    with pytest.raises(ValueError, match="rel_pos.relative"):
        lesa.resize_pos_embed(create_model("lesa_resnet_tiny").state_dict(), 64, old_size=32)


@pytest.mark.parametrize("size", [(224, 224), (256, 192), (160, 320), (288, 288)])
def test_lesa_resnet50_rel2d_any_size(size):
    torch.manual_seed(0)
    ref = create_model("lesa_resnet50", pos_embed="rel2d", impl="reference", num_classes=10)
    fused = create_model("lesa_resnet50", pos_embed="rel2d", impl="fused", num_classes=10)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        for train in (True, False):
            ya, yb = ref.train(train)(x), fused.train(train)(x)
            torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)


def test_auto_picks_by_size():
    assert resolve_auto("rel2d", 64 * 64) == "fused"
    assert resolve_auto("flat", 64 * 64) == "fused"
    assert resolve_auto("flat", 14 * 14) == "dense"
    assert resolve_auto("rel2d", 14 * 14) == "reference"
    assert create_model("lesa_resnet_tiny").layer4[0].conv2.binary.impl == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pos_embed", ["rel2d", "flat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_matches_float64_reference(pos_embed, dtype):
    torch.manual_seed(0)
    ref = LESA2d(64, 64, heads=8, pos_embed=pos_embed, feature_size=16, impl="reference").double().train()
    fused = copy.deepcopy(ref).cuda().to(dtype)
    fused.binary.impl = "fused"
    x = torch.randn(2, 64, 16, 16, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.cuda().to(dtype).requires_grad_()
    ya, yb = ref(xa), fused(xb)
    ya.square().sum().backward()
    yb.float().square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rel = lambda a, b: ((a.double().cpu() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(yb, ya) < tol
    assert rel(xb.grad, xa.grad) < 3 * tol


@pytest.mark.parametrize("band", [True, False])
def test_moment_functions_have_exact_gradients(band, monkeypatch):
    """The logit-BN moments' closed-form backward (DotProductMoments, SlidingWindowRows: window sums as a
    band product for small maps, prefix sums for large ones) against finite differences, float64."""
    from lesa.layers import bn_moments

    monkeypatch.setattr(bn_moments, "BAND_MAX_POSITIONS", 256 if band else 0)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=gen).requires_grad_()
    k = (torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    table = torch.randn(4, 13, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(bn_moments.DotProductMoments.apply, (q, k))
    assert torch.autograd.gradcheck(bn_moments.SlidingWindowRows.apply, (q, table))


@pytest.mark.parametrize("impl,block_elems", [("auto", None), ("fused", 2 * 2 * 20 * 8)])
def test_a_second_derivative_through_the_flat_kernels_is_refused_not_wrong(impl, block_elems):
    """The dense kernel saves probabilities without a graph and the blocked one recomputes under its own
    autograd: neither has a second derivative, so a gradient penalty raises instead of returning numbers
    that treat the attention as constant."""
    layer = LESA2d(16, 16, heads=2, feature_size=(4, 5), impl=impl).double()
    layer.binary.block_elems = block_elems
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.square().sum().backward()


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_sync_batch_norm_across_processes_trains_on_the_reference_path(monkeypatch, impl):
    """The fused paths' BN moments are the local batch's: under DDP with SyncBatchNorm (convert_sync_batchnorm)
    the layer trains on the reference path, which calls the synchronised modules; eval and one process keep
    the fused path (running statistics, or local = global)."""
    plain = LESA2d(32, 32, heads=4, feature_size=14, impl=impl)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    fast = resolve_auto("flat", 14 * 14) if impl == "auto" else impl
    assert synced.binary.resolve_impl(14, 14) == fast  # no process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert synced.binary.resolve_impl(14, 14) == "reference"
    assert synced.binary.resolve_impl(14, 14, masked=True) == fast  # padded: local moments on every path
    assert synced.eval().binary.resolve_impl(14, 14) == fast
    synced.train()
    for bn in (synced.binary.bn_logits, synced.binary.bn_out):
        bn.eval()  # frozen, as the detection backbone keeps its BatchNorms: running statistics
    assert synced.binary.resolve_impl(14, 14) == fast
    assert plain.train().binary.resolve_impl(14, 14) == fast  # plain BatchNorm2d: per-process statistics anyway
