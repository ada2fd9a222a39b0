"""Padded batches: the binary term attends only to keys inside each image and counts only what lies inside in
its BatchNorm statistics; reference and fused paths agree (float64) with each other and with an independent
computation on each image's crop; the detection backbone knows the images' sizes, and an image's features and
detections depend on what it is batched with no more than with a convolutional backbone."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_step, bn_affines
from torchvision.ops import box_iou

from lesa import LESA2d, SelfAttention2d
from lesa.detection import build_maskrcnn
from lesa.detection.backbone import IMAGE_SIZES_ATTR
from lesa.errors import ConfigError, InputError
from lesa.layers import BinaryAttention2d, ablate_unary, bn_moments
from lesa.layers.padding import BatchPadding, batch_padding
from lesa.layers.rel2d_attention import ROWS_PER_GROUP

F64 = torch.float64


# -- an independent computation: each image's crop alone, BatchNorm statistics pooled over the crops ----------------
def pooled_batch_norm(parts, bn, training):
    """``parts``: ``(C, m_n)`` tensors (each image's entries per channel). Statistics over all their entries in
    training (returns the running statistics nn.BatchNorm2d would keep), the running ones in eval."""
    if training:
        joined = torch.cat(parts, dim=1)
        mean, var, n = joined.mean(1), joined.var(1, unbiased=False), joined.shape[1]
        stats = ((1 - bn.momentum) * bn.running_mean + bn.momentum * mean,
                 (1 - bn.momentum) * bn.running_var + bn.momentum * var * n / (n - 1))
    else:
        mean, var, stats = bn.running_mean, bn.running_var, (bn.running_mean, bn.running_var)
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return [(p - mean[:, None]) * scale[:, None] + bn.bias[:, None] for p in parts], stats


def naive_padded_binary(b, x, sizes, training):
    """The 'rel2d' binary term ``b`` on the crops ``x[n, :, :h, :w]``: every query and key of a crop is inside
    its image; relative offsets from coordinates, the tables indexed from their centre (offset 0). Returns
    the crops' outputs ``(C, h, w)`` and ``{bn name: new running stats}``."""
    g, dq, dv = b.heads, b.qk_dim, b.v_dim
    crops = [x[n, :, :h, :w] for n, (h, w) in enumerate(sizes)]
    stats = {}
    projected, stats["bn_qkv"] = pooled_batch_norm([F.conv2d(c[None], b.qkv.weight)[0].flatten(1) for c in crops],
                                                   b.bn_qkv, training)
    logit_parts, values = [], []
    for qkv, (h, w) in zip(projected, sizes):
        qkv = qkv.reshape(g, 2 * dq + dv, h * w)
        q, k, v = qkv[:, :dq], qkv[:, dq:2 * dq], qkv[:, 2 * dq:]
        ys, xs = torch.arange(h * w) // w, torch.arange(h * w) % w
        centre_h, centre_w = (b.rel_pos.height.shape[0] - 1) // 2, (b.rel_pos.width.shape[0] - 1) // 2
        rh = b.rel_pos.height[centre_h + ys[None, :] - ys[:, None]]  # [query, key]: offset key row - query row
        rw = b.rel_pos.width[centre_w + xs[None, :] - xs[:, None]]
        qk = torch.einsum("gci,gcj->gij", q, k)
        rel = torch.einsum("gci,ijc->gij", q, rh) + torch.einsum("gci,ijc->gij", q, rw)
        logit_parts.append(torch.cat([qk, rel]).flatten(1))  # (2G, p*p)
        values.append(v)
    logit_parts, stats["bn_logits"] = pooled_batch_norm(logit_parts, b.bn_logits, training)
    outs = []
    for logits, v, (h, w) in zip(logit_parts, values, sizes):
        logits = logits.view(2, g, h * w, h * w).sum(0)
        outs.append(torch.einsum("gij,gcj->gci", torch.softmax(logits, -1), v).reshape(g * dv, h * w))
    outs, stats["bn_out"] = pooled_batch_norm(outs, b.bn_out, training)
    return [o.view(-1, h, w) for o, (h, w) in zip(outs, sizes)], stats


def make(cls, impl, size, dtype=F64, **kw):
    torch.manual_seed(0)
    return bn_affines(cls(32, 32, heads=4, pos_embed="rel2d", feature_size=size, impl=impl, **kw).to(dtype))


def inside(sizes, height, width, dtype=F64):
    """``(N, 1, H, W)`` 1 inside each image."""
    mask = torch.zeros(len(sizes), 1, height, width, dtype=dtype)
    for n, (h, w) in enumerate(sizes):
        mask[n, :, :h, :w] = 1
    return mask


SIZES = {(6, 7): [(6, 7), (3, 4), (5, 2)], (19, 5): [(19, 5), (4, 3), (17, 5)]}  # (19, 5): several key-row groups


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("size", list(SIZES))
def test_masked_binary_term_equals_each_crop_alone(impl, size):
    """Outputs inside the images, every gradient and the BN running statistics equal the naive computation on
    the crops (two training steps, then eval); nothing reaches the padding's inputs."""
    sizes = SIZES[size]
    layer = make(BinaryAttention2d, impl, size)
    valid = torch.tensor(sizes)
    x = torch.randn(3, 32, *size, dtype=F64) * 1.5 + 0.3
    keep = inside(sizes, *size)
    for training in (True, True, False):
        layer.train(training).zero_grad(set_to_none=True)
        naive = copy.deepcopy(layer)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = layer(xa, valid)
        expected, stats = naive_padded_binary(naive, xb, sizes, training)
        assert torch.isfinite(out).all()  # queries in the padding: finite, whatever they are
        grad = torch.randn_like(out)
        (out * grad * keep).sum().backward()
        sum((e * grad[n, :, :h, :w]).sum() for n, (e, (h, w)) in enumerate(zip(expected, sizes))).backward()
        for n, (h, w) in enumerate(sizes):
            torch.testing.assert_close(out[n, :, :h, :w], expected[n], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xa.grad * keep, xb.grad, rtol=1e-9, atol=1e-10)
        assert float((xa.grad * (1 - keep)).abs().max()) < 1e-12
        for (name, p), q in zip(layer.named_parameters(), naive.parameters()):
            if not name.endswith("bn_logits.bias"):  # softmax is shift invariant: zero up to rounding
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        for name, (mean, var) in stats.items():
            bn = getattr(layer, name)
            torch.testing.assert_close(bn.running_mean, mean.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(bn.running_var, var.detach(), rtol=1e-10, atol=1e-12)


def padded(sizes, x):
    """A context factory: ``x``'s batch with images of ``sizes`` in its top-left corners."""
    return lambda: batch_padding(torch.tensor(sizes), x.shape[-2:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("cls,checkpoint", [(LESA2d, False), (LESA2d, True), (SelfAttention2d, False)])
def test_masked_fused_equals_reference(cls, checkpoint, size, dtype):
    """The fused 'rel2d' path (padded keys on the one-hot columns, BN scales from masked moments) computes the
    reference's function in a padded batch, with layer-level checkpointing too."""
    ref = make(cls, "reference", size, dtype, checkpoint=checkpoint)
    fused = copy.deepcopy(ref)
    fused.binary.impl = "fused"
    x = torch.randn(3, 32, *size, dtype=dtype) * 1.5 + 0.3
    for _ in range(2):
        assert_same_step(ref.train(), fused.train(), x, dtype, padded(SIZES[size], x))
    assert_same_step(ref.eval(), fused.eval(), x, dtype, padded(SIZES[size], x))


def test_unary_ablation_in_a_padded_batch():
    """Table 1's ablation (each query's own term dropped) on a padded batch: both paths agree."""
    ref = make(SelfAttention2d, "reference", (19, 5)).eval()
    fused = copy.deepcopy(ref)
    fused.binary.impl = "fused"
    x = torch.randn(3, 32, 19, 5, dtype=F64)
    with batch_padding(torch.tensor(SIZES[(19, 5)]), (19, 5)), ablate_unary(ref), ablate_unary(fused):
        ablated = ref(x)
        torch.testing.assert_close(fused(x), ablated, rtol=1e-10, atol=1e-10)
    with batch_padding(torch.tensor(SIZES[(19, 5)]), (19, 5)):
        assert not torch.allclose(ref(x), ablated)


def test_checkpointed_layer_recomputes_with_the_mask():
    """checkpoint=True recomputes the terms in backward, outside batch_padding: the same gradients and BN
    statistics as without checkpointing."""
    plain = make(LESA2d, "fused", (6, 7))
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    x = torch.randn(3, 32, 6, 7, dtype=F64)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with batch_padding(torch.tensor(SIZES[(6, 7)]), (6, 7)):
            ya, yb = plain.train()(xa), ckpt.train()(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(xb.grad, xa.grad)
        for a, b in zip(plain.parameters(), ckpt.parameters()):
            torch.testing.assert_close(b.grad, a.grad)
        for a, b in zip(plain.buffers(), ckpt.buffers()):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("training", [True, False])
def test_padding_contents_do_not_reach_the_images(impl, training):
    """Whatever the padding holds, a LESA layer's output is the same over the images (and, its input zeroed
    outside them, everywhere); the binary term's over the images."""
    sizes, size = SIZES[(19, 5)], (19, 5)
    layer = make(LESA2d, impl, size).train(training)
    x = torch.randn(3, 32, *size, dtype=F64)
    keep = inside(sizes, *size)
    junk = x + (1 - keep) * torch.randn_like(x) * 1e3
    outs, binaries = [], []
    for inp in (x, junk):
        with batch_padding(torch.tensor(sizes), size):
            outs.append(copy.deepcopy(layer)(inp))
        binaries.append(copy.deepcopy(layer.binary)(inp, torch.tensor(sizes)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(binaries[1] * keep, binaries[0] * keep, rtol=1e-10, atol=1e-10)


def test_no_padding_takes_the_unmasked_path(monkeypatch):
    """Without a mask nothing of the masked path runs (classification is unchanged)."""
    def refuse(*args, **kwargs):
        raise AssertionError("masked path used without a mask")

    for name in ("masked_batch_norm", "masked_bn_logit_affine", "masked_dot_product_moments",
                 "masked_separable_moments"):
        monkeypatch.setattr(f"lesa.layers.binary.{name}", refuse)
    monkeypatch.setattr("lesa.layers.binary.KeyMask.from_valid_size", refuse)
    x = torch.randn(2, 32, 6, 7, dtype=F64)
    for impl in ("reference", "fused"):
        layer = make(LESA2d, impl, (6, 7), checkpoint=True)
        layer.train()(x.clone().requires_grad_()).sum().backward()
        layer.eval()(x)


def test_batch_padding_converts_sizes_to_each_map():
    padding = BatchPadding(torch.tensor([[100, 70], [128, 96], [1, 1]]), (128, 96))
    assert padding.valid_size(32, 24).tolist() == [[25, 18], [32, 24], [1, 1]]  # stride 4: ceil(size / 4)
    assert padding.valid_size(4, 3).tolist() == [[4, 3], [4, 3], [1, 1]]        # stride 32


def test_flat_layers_and_bad_sizes_are_refused_in_one_line():
    flat = BinaryAttention2d(32, 32, heads=4, pos_embed="flat", feature_size=5)
    x = torch.randn(2, 32, 5, 5)
    with pytest.raises(ConfigError, match="pos_embed='flat' takes no padding mask.*pos_embed='rel2d'") as err:
        flat(x, torch.tensor([[5, 5], [3, 4]]))
    assert "\n" not in str(err.value)
    padding = batch_padding(torch.tensor([[20, 20], [12, 16]]), (20, 20))
    with pytest.raises(ConfigError, match="pos_embed='rel2d'"), padding:
        LESA2d(32, 32, heads=4, pos_embed="flat", feature_size=5)(x)
    layer = BinaryAttention2d(32, 32, heads=4, pos_embed="rel2d", feature_size=5)
    for bad in (torch.tensor([[5.0, 5.0], [3.0, 4.0]]), torch.tensor([[5, 5]]), [[5, 5], [3, 4]]):
        with pytest.raises(InputError, match=r"valid_size must be an integer tensor of shape \(2, 2\)"):
            layer(x, bad)
    padding = batch_padding(torch.tensor([[5, 5], [3, 4]]), (5, 5))
    with pytest.raises(InputError, match="torch.fx"), padding:
        torch.fx.symbolic_trace(SelfAttention2d(32, 32, heads=4, pos_embed="rel2d", feature_size=5))


def test_compile_reads_the_padding_context():
    """torch.compile guards on the context: a compiled layer masks inside it and not outside."""
    layer = make(SelfAttention2d, "fused", (6, 7)).eval()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(3, 32, 6, 7, dtype=F64)
    sizes = torch.tensor(SIZES[(6, 7)])
    with batch_padding(sizes, (6, 7)):
        expected = layer(x)
        torch.testing.assert_close(compiled(x), expected)
    torch.testing.assert_close(compiled(x), layer(x))
    assert not torch.allclose(layer(x), expected)


# -- the detection backbone ---------------------------------------------------------------------------------------
def smooth_image(height, width, gen):
    coarse = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=gen)
    field = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (field + 0.05 * torch.randn(3, height, width, generator=gen)).clamp(0, 1)


def detector(backbone):
    torch.manual_seed(0)
    model = build_maskrcnn(backbone, num_classes=4, min_size=128, max_size=192).eval()
    model.transform.resize = lambda image, target=None: (image, target)  # keep the images' sizes
    model.rpn._post_nms_top_n["testing"] = model.rpn._pre_nms_top_n["testing"] = 200
    model.roi_heads.detections_per_img = 20
    return model


def first_image_features(model, images):
    batch, _ = model.transform(images)
    captured = {}
    hook = model.backbone.fpn.register_forward_pre_hook(lambda _, args: captured.update(body=args[0]))
    with torch.no_grad():
        fpn = model.backbone(batch.tensors)
    hook.remove()
    return [f[0] for f in captured["body"].values()], [f[0] for f in fpn.values()]


def relative_change(alone, batched, size, strides):
    diff = norm = 0.0
    for a, b, stride in zip(alone, batched, strides):
        rows, cols = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        diff += float((b[:, :rows, :cols] - a[:, :rows, :cols]).square().sum())
        norm += float(a[:, :rows, :cols].square().sum())
    return math.sqrt(diff / norm)


def test_detector_transform_tells_the_backbone_the_image_sizes():
    model = detector("lesa_resnet_tiny")
    gen = torch.Generator().manual_seed(0)
    images = [smooth_image(96, 128, gen), smooth_image(160, 192, gen)]
    batch, _ = model.transform(images)
    assert getattr(batch.tensors, IMAGE_SIZES_ATTR) == [(96, 128), (160, 192)]
    untagged = batch.tensors.clone()
    with torch.no_grad():
        told, explicit, blind = (model.backbone(batch.tensors), model.backbone(untagged, [(96, 128), (160, 192)]),
                                 model.backbone(untagged))
    assert all(torch.equal(told[k], explicit[k]) for k in told)
    assert not torch.allclose(told["3"], blind["3"])
    model.backbone.body.set_grad_checkpointing(True)
    with pytest.raises(ConfigError, match="checkpoint=True"):
        model.backbone.train()(untagged, [(96, 128), (160, 192)])


def test_lesa_features_and_detections_depend_on_the_batch_no_more_than_a_conv_backbones():
    """Eval mode, random weights, default BN statistics: an image alone vs batched with a larger one. The
    LESA backbone's stage 3-4 features (its attention layers) and FPN features change less than the conv
    backbone's, and its detections no more (``benchmarks/batch_invariance.py`` measures more pairs)."""
    gen = torch.Generator().manual_seed(0)
    small, large = smooth_image(96, 128, gen), smooth_image(160, 192, gen)
    changes = {}
    for name in ("resnet_tiny", "lesa_resnet_tiny"):
        model = detector(name)
        (body_a, fpn_a), (body_b, fpn_b) = (first_image_features(model, imgs) for imgs in ([small], [small, large]))
        with torch.no_grad():
            alone, batched = model([small])[0], model([small, large])[0]
        same = alone["labels"][:, None] == batched["labels"][None, :]
        changes[name] = dict(
            stages_3_4=relative_change(body_a[2:], body_b[2:], (96, 128), (16, 32)),
            fpn=relative_change(fpn_a, fpn_b, (96, 128), (4, 8, 16, 32, 64)),
            detections=float(1 - (box_iou(alone["boxes"], batched["boxes"]) * same).max(1).values.mean()))
    conv, lesa = changes["resnet_tiny"], changes["lesa_resnet_tiny"]
    assert lesa["stages_3_4"] < 0.25 * conv["stages_3_4"], changes
    assert lesa["fpn"] <= conv["fpn"], changes
    assert lesa["detections"] <= conv["detections"] + 0.02, changes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_masked_fused_matches_float64_reference(dtype):
    """The flash kernels with padded keys on the one-hot columns (MASKED_LOGIT in half precision too)."""
    size, sizes = (2 * ROWS_PER_GROUP, 16), [(32, 16), (9, 5)]
    ref = make(LESA2d, "reference", size).train()
    fused = copy.deepcopy(ref).cuda().to(dtype)
    fused.binary.impl = "fused"
    x = torch.randn(2, 32, *size, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.cuda().to(dtype).requires_grad_()
    with batch_padding(torch.tensor(sizes), size):
        ya = ref(xa)
    with batch_padding(torch.tensor(sizes).cuda(), size):
        yb = fused(xb)
    ya.square().sum().backward()
    yb.float().square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rel = lambda a, b: ((a.double().cpu() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(yb, ya) < tol
    assert rel(xb.grad, xa.grad) < 3 * tol


def test_masked_moments_are_the_moments_of_the_pairs_inside():
    """The fused path's masked moment helpers against the logits materialised and selected, float64."""
    gen = torch.Generator().manual_seed(0)
    n, g, h, w, d = 2, 3, 5, 4, 6
    q, k = (torch.randn(n, g, h * w, d, generator=gen, dtype=F64) + 0.3 for _ in range(2))
    rows = torch.randn(n, g, h * w, h, generator=gen, dtype=F64)
    cols = torch.randn(n, g, h * w, w, generator=gen, dtype=F64)
    sizes = [(5, 4), (2, 3)]
    mask = inside(sizes, h, w)[:, 0].flatten(1)  # (N, P)
    count = mask.sum(-1, keepdim=True)
    dot = bn_moments.masked_dot_product_moments(q, k, mask[:, None, :, None], count)
    row_w = torch.stack([torch.arange(h) < s[0] for s in sizes]).to(F64)[:, None, None]
    col_w = torch.stack([torch.arange(w) < s[1] for s in sizes]).to(F64)[:, None, None]
    sep = bn_moments.masked_separable_moments(rows, cols, row_w, col_w, mask[:, None])
    for i in range(len(sizes)):
        keep = mask[i].bool()
        logits = {"dot": q[i] @ k[i].transpose(-1, -2),
                  "sep": (rows[i].unsqueeze(-1) + cols[i].unsqueeze(-2)).flatten(-2)}
        for name, (mean, m2) in (("dot", dot), ("sep", sep)):
            chosen = logits[name][:, keep][:, :, keep].flatten(1)
            torch.testing.assert_close(mean[i], chosen.mean(-1))
            torch.testing.assert_close(m2[i], (chosen - chosen.mean(-1, keepdim=True)).square().sum(-1))


@pytest.mark.parametrize("training", [True, False])
def test_a_sync_batch_norm_takes_the_padded_batchs_statistics_inside_the_images(training):
    """convert_sync_batchnorm'd binary term (one process): the same function as the BatchNorm2d one in a padded
    batch; its bn_qkv / bn_out statistics counted the padding before."""
    sizes, size = SIZES[(6, 7)], (6, 7)
    plain = make(BinaryAttention2d, "fused", size).train(training)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced.bn_qkv, torch.nn.SyncBatchNorm)
    x = torch.randn(3, 32, *size, dtype=F64) * 1.5 + 0.3
    keep = inside(sizes, *size)
    junk = x + (1 - keep) * torch.randn_like(x) * 1e3
    expected = plain(x, torch.tensor(sizes))
    torch.testing.assert_close(synced(junk, torch.tensor(sizes)) * keep, expected * keep, rtol=1e-10, atol=1e-10)
    for name in ("bn_qkv", "bn_out"):
        torch.testing.assert_close(getattr(synced, name).running_mean, getattr(plain, name).running_mean)
