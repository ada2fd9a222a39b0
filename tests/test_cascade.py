"""Cascade Mask R-CNN and HTC: losses and gradients of every stage, refined boxes between stages, interleaved
execution, mask information flow, test-time averaging, the semantic branch, the RoI pooling against
torchvision's and the heads against a plain reference (float64), and the commands."""
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign

from lesa.cli import main
from lesa.data.digit_scenes import ensure_digit_scenes
from lesa.detection import DetectionTransform, FusedSemanticHead, build_detector, build_maskrcnn
from lesa.detection.cascade import cascade_box_loss, semantic_targets
from lesa.detection.config import build_det_config
from lesa.detection.predict import output_names
from lesa.detection.roi_align import CascadeRoIAlign, RoIMaps
from lesa.engine import read_metrics_csv
from lesa.errors import ConfigError
from lesa.layers import AttentionAugmentedConv2d, LESA2d, SelfAttention2d

pytest.importorskip("pycocotools")

SIZES = [(96, 128), (128, 96)]  # non-square, different within the batch


def targets(sizes=SIZES, semantic=False):
    out = []
    for h, w in sizes:
        boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        target = dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks)
        if semantic:
            target["semantic"] = masks[0].long() + 2 * masks[1].long() * (1 - masks[0].long())
        out.append(target)
    return out


def images(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def detector(kind, semantic=None, backbone="lesa_resnet_tiny", **kw):
    torch.manual_seed(0)
    return build_detector(kind, backbone, 3, min_size=96, max_size=128, semantic_classes=semantic,
                          **{"box_batch_size_per_image": 64, **kw})


@pytest.mark.parametrize("kind,semantic", [("cascade_maskrcnn", None), ("htc", None), ("htc", 3)])
def test_every_loss_is_finite_and_gradients_reach_every_stage(kind, semantic):
    model = detector(kind, semantic)
    losses = model(images(), targets(semantic=bool(semantic)))
    stages = [f"s{i}.{n}" for i in range(3) for n in ("loss_classifier", "loss_box_reg", "loss_mask")]
    assert set(losses) == {*stages, "loss_objectness", "loss_rpn_box_reg", *(["loss_semantic"] if semantic else [])}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    heads = model.roi_heads
    for i in range(3):
        assert heads.box_heads[i].cls_score.weight.grad.abs().sum() > 0, i
        assert heads.mask_heads[i].logits.weight.grad.abs().sum() > 0, i
    if kind == "htc":
        assert all(heads.mask_heads[i].conv_res.weight.grad.abs().sum() > 0 for i in (1, 2))
    if semantic:
        assert heads.semantic_head.logits.weight.grad.abs().sum() > 0
        assert heads.semantic_head.lateral[4].weight.grad.abs().sum() > 0  # every FPN level reaches the head
    assert model.backbone.body.conv1.weight.grad is not None and model.rpn.head.conv[0][0].weight.grad is not None


@pytest.mark.parametrize("kind", ["fasterrcnn", "cascade_rcnn"])
def test_box_only_detectors_train_and_detect_without_masks(kind):
    """Faster R-CNN and Cascade R-CNN learn from targets without masks and predict boxes only."""
    model = detector(kind)
    box_targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets()]
    losses = model(images(), box_targets)
    heads = ("loss_classifier", "loss_box_reg")
    expected = heads if kind == "fasterrcnn" else tuple(f"s{i}.{n}" for i in range(3) for n in heads)
    assert set(losses) == {*expected, "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert not any("mask" in name for name, _ in model.named_parameters())
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        outputs = model(images())
    assert all(set(o) == {"boxes", "labels", "scores"} and len(o["boxes"]) for o in outputs)


@pytest.mark.parametrize("kind", ["cascade_maskrcnn", "htc"])
def test_later_stages_train_on_the_boxes_the_previous_stage_refined(kind):
    model = detector(kind)
    heads = model.roi_heads
    shift = 2.0  # stage 1 moves every box right by 2.0 / 10 of its width (the coder's weight is 1 / 0.1)
    with torch.no_grad():
        heads.box_heads[0].bbox_pred.weight.zero_()
        heads.box_heads[0].bbox_pred.bias.copy_(torch.tensor([shift, 0.0, 0.0, 0.0]))
    pooled = []
    heads.box_roi_pool.register_forward_pre_hook(lambda m, args: pooled.append([b.clone() for b in args[1]]))
    model(images(), targets())
    assert len(pooled) == 3  # one call per stage
    for image, (first, second) in enumerate(zip(pooled[0], pooled[1])):
        shape = model.transform(images(), targets())[0].image_sizes[image]
        expected = first.clone()
        width = first[:, 2] - first[:, 0]
        expected[:, [0, 2]] += shift / 10 * width[:, None]
        expected[:, [0, 2]] = expected[:, [0, 2]].clamp(0, shape[1])
        gt = model.transform(images(), targets())[1][image]["boxes"]
        for box in second:
            from_stage_1 = (expected - box).abs().max(1).values.min() < 1e-3
            is_gt = (gt - box).abs().max(1).values.min() < 1e-3
            assert from_stage_1 or is_gt, box  # never an unrefined stage-1 proposal
        assert not all((first - box).abs().max(1).values.min() < 1e-3 for box in second)


def test_htc_mask_heads_train_on_refined_boxes_interleaved():
    calls = {}
    for kind in ("cascade_maskrcnn", "htc"):
        model = detector(kind)
        with torch.no_grad():
            model.roi_heads.box_heads[0].bbox_pred.weight.zero_()
            model.roi_heads.box_heads[0].bbox_pred.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
        box_rois, mask_rois = [], []
        model.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a, r=box_rois: r.append(torch.cat(a[1])))
        model.roi_heads.mask_roi_pool.register_forward_pre_hook(lambda m, a, r=mask_rois: r.append(torch.cat(a[1])))
        model(images(), targets())
        calls[kind] = box_rois, mask_rois
    # Cascade: stage 1's mask RoIs are among stage 1's box RoIs; HTC: among the boxes stage 1 refined
    box_rois, mask_rois = calls["cascade_maskrcnn"]
    assert all((box_rois[0] - m).abs().max(1).values.min() < 1e-4 for m in mask_rois[0])
    box_rois, mask_rois = calls["htc"]
    assert not all((box_rois[0] - m).abs().max(1).values.min() < 1e-4 for m in mask_rois[0])


def test_mask_information_flow():
    model = detector("htc").eval()
    cascade = detector("cascade_maskrcnn").eval()
    x = images()
    for net in (model, cascade):
        transformed = net.transform(x)[0]
        features = net.backbone(transformed.tensors)
        rois = [torch.tensor([[8.0, 8.0, 60.0, 60.0]]), torch.tensor([[20.0, 10.0, 70.0, 90.0]])]
        before = net.roi_heads.mask_logits(2, features, rois, transformed.image_sizes, None)[-1]
        with torch.no_grad():
            net.roi_heads.mask_heads[0].convs[0].weight.mul_(1.5)
        after = net.roi_heads.mask_logits(2, features, rois, transformed.image_sizes, None)[-1]
        changed = not torch.allclose(before, after)
        assert changed == (net is model)  # stage 3's mask depends on stage 1's head only with the flow


def test_test_time_averaging_of_scores_and_masks(monkeypatch):
    model = detector("htc").eval()
    heads = model.roi_heads
    stage_logits = [torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, -1.0, 3.0]), torch.tensor([0.0, 0.5, 0.5])]
    mask_values = [-2.0, 0.5, 3.0]
    for head, logits in zip(heads.box_heads, stage_logits):
        monkeypatch.setattr(head, "forward", lambda x, c=logits: (c.expand(len(x), -1), x.new_zeros(len(x), 4)))
    for head, value in zip(heads.mask_heads, mask_values):
        monkeypatch.setattr(head, "forward", lambda x, prev=None, v=value: (x.new_full((len(x), 3, 28, 28), v),
                                                                             x.new_zeros(len(x), 256, 14, 14)))
    transformed = model.transform(images())[0]
    features = model.backbone(transformed.tensors)
    proposals = [torch.tensor([[5.0, 5.0, 40.0, 40.0], [60.0, 50.0, 90.0, 90.0]])] * 2
    with torch.no_grad():
        results, _ = heads(features, proposals, transformed.image_sizes)
    probs = F.softmax(torch.stack(stage_logits).mean(0), -1)  # the logits averaged, then the softmax
    mask_prob = torch.tensor(mask_values).sigmoid().mean()  # the sigmoids averaged
    for result in results:
        assert len(result["scores"]) == 4  # 2 RoIs x 2 classes above the threshold
        for score, label in zip(result["scores"], result["labels"]):
            assert score == pytest.approx(float(probs[label]), abs=1e-6)
        torch.testing.assert_close(result["masks"], torch.full_like(result["masks"], float(mask_prob)))


def random_boxes(n, height, width, generator):
    """Boxes of every kind RoIAlign meets: inside, across the border, outside, thinner than a pixel, large."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([width + 20.0, height + 20.0]) - 10
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) ** 3 * torch.tensor([width, height]) * 1.5 + 0.05
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("output_size,semantic", [(7, True), (14, True), (7, False)])
@pytest.mark.parametrize("sparse", [True, False])
def test_the_roi_pooling_is_torchvisions_in_float64(output_size, semantic, sparse, monkeypatch):
    """CascadeRoIAlign = torchvision's MultiScaleRoIAlign over the FPN levels (+ the semantic map pooled at 14x14
    and averaged to the output size, as mmdetection's HTC), values and gradients, on the CPU's sparse product
    and on the path other devices take (torchvision's roi_align)."""
    monkeypatch.setattr(RoIMaps, "sparse", property(lambda self: sparse))
    g = torch.Generator().manual_seed(0)
    shapes = [(120, 90), (96, 128)]  # padded to 128 x 128
    features = OrderedDict((str(i), torch.randn(2, 5, 128 // 2 ** (i + 2), 128 // 2 ** (i + 2), generator=g,
                                                dtype=torch.float64, requires_grad=True)) for i in range(4))
    features["pool"] = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64)
    sem = torch.randn(2, 5, 16, 16, generator=g, dtype=torch.float64, requires_grad=True) if semantic else None
    boxes = [random_boxes(40, h, w, g) for h, w in shapes]
    boxes[0][0] = torch.tensor([-50.0, 20.0, 250.0, 260.0])  # level 2, across the border
    boxes[1][0] = torch.tensor([0.0, 0.0, 600.0, 500.0])  # level 3, mostly outside
    boxes[1][1] = torch.tensor([10.0, 10.0, 190.0, 150.0])  # level 1
    ours = CascadeRoIAlign(["0", "1", "2", "3"], output_size, 2)
    out = ours(RoIMaps(features, sem), boxes, shapes)
    expected = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)(features, boxes, shapes)
    if semantic:
        pooled = MultiScaleRoIAlign(["semantic"], 14, 2)({"semantic": sem}, boxes, shapes)
        expected = expected + F.adaptive_avg_pool2d(pooled, output_size)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    inputs = [*(features[str(i)] for i in range(4)), *([sem] if semantic else [])]
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    levels = ours.map_levels(boxes)
    assert len(set(levels.tolist())) == 4  # every level sampled
    assert ours(features, boxes[:1], shapes).shape == (40, 5, output_size, output_size)  # a dict: FPN alone
    assert ours(RoIMaps(features, sem), [b[:0] for b in boxes], shapes).shape == (0, 5, output_size, output_size)


def reference_heads_forward(heads, features, proposals, image_shapes, targets):
    """The cascade's training losses written plainly (the heads before they were made fast): torchvision's
    MultiScaleRoIAlign for the box (7x7) and mask (14x14) features, the semantic features pooled at 14x14 and
    average-pooled to the box size, and every mask head of the chain run in full."""
    box_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    mask_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    semantic_pool = MultiScaleRoIAlign(["semantic"], 14, 2)
    semantic_logits, semantic = (None, None)
    if heads.semantic_head is not None:
        semantic_logits, semantic = heads.semantic_head(list(features.values()))

    def pool(pooler, rois):
        x = pooler(features, rois, image_shapes)
        if semantic is not None:
            x = x + F.adaptive_avg_pool2d(semantic_pool({"semantic": semantic}, rois, image_shapes), x.shape[-2:])
        return x

    losses, rois = {}, [p.detach() for p in proposals]
    for stage, weight in enumerate(heads.stage_weights):
        samples = heads.sample(stage, rois, targets)
        logits, deltas = heads.box_heads[stage](pool(box_pool, [s.rois for s in samples]))
        loss_cls, loss_box = cascade_box_loss(logits, deltas, samples)
        with torch.no_grad():
            rois = heads.refine(stage, samples, deltas, image_shapes)
        mask_samples = heads.sample(stage, rois, targets) if heads.interleaved else samples
        positive = [s.labels > 0 for s in mask_samples]
        mask_rois = [s.rois[p] for s, p in zip(mask_samples, positive)]
        assert sum(len(r) for r in mask_rois)
        x, previous = pool(mask_pool, mask_rois), None
        for head in heads.mask_heads[: stage + 1]:
            mask_logits, previous = head(x, previous if heads.mask_info_flow else None)
        matched = [s.matched[p] for s, p in zip(mask_samples, positive)]
        loss_mask = maskrcnn_loss(mask_logits, mask_rois, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], matched)
        losses.update({f"s{stage}.loss_classifier": weight * loss_cls, f"s{stage}.loss_box_reg": weight * loss_box,
                       f"s{stage}.loss_mask": weight * loss_mask})
    if semantic is not None:
        padded = [s * 4 for s in features["0"].shape[-2:]]
        losses["loss_semantic"] = heads.semantic_head.loss(semantic_logits, semantic_targets(targets, padded))
    return [], losses


def test_the_heads_compute_what_the_plain_reference_computes(monkeypatch):
    """Losses and every gradient of an HTC training step (semantic branch, interleaving, information flow),
    float64, for a fixed seed: the fast heads (one sparse RoIAlign product per pooling, the semantic term taken
    at the output size, the earlier mask heads of the flow run for their features only) against
    :func:`reference_heads_forward`."""
    sizes = [(64, 96), (96, 64)]
    model = detector("htc", 3, box_batch_size_per_image=16, rpn_post_nms_top_n_train=64).double()
    x, t = [i.double() for i in images(sizes)], targets(sizes, semantic=True)
    results = []
    for reference in (False, True):
        if reference:
            monkeypatch.setattr(model.roi_heads, "forward", lambda *a: reference_heads_forward(model.roi_heads, *a))
        model.zero_grad()
        torch.manual_seed(1)
        losses = model(x, t)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (losses, grads), (ref_losses, ref_grads) = results
    assert set(losses) == set(ref_losses) and set(grads) == set(ref_grads)
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-10, atol=0.0)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12 * scale, msg=name)
    assert all(ref_grads[f"roi_heads.mask_heads.{i}.convs.0.weight"].abs().sum() > 0 for i in range(3))


def test_the_semantic_loss_ignores_255():
    head = FusedSemanticHead(5, 8, num_classes=4, channels=8)
    logits = torch.randn(1, 4, 8, 8)
    labels = torch.randint(0, 4, (1, 64, 64))
    labels[:, :32] = 255
    loss = head.loss(logits, labels)
    changed = logits.clone()
    changed[..., :4, :] = 100 * torch.randn(1, 4, 4, 8)  # only where the labels are ignored
    assert head.loss(changed, labels) == pytest.approx(float(loss))
    small = labels[:, ::8, ::8]
    expected = 0.2 * F.cross_entropy(logits, small, ignore_index=255)
    assert float(loss) == pytest.approx(float(expected))


def test_a_two_image_overfit_drives_every_loss_down():
    """HTC with the semantic branch overfits two images: every classification, mask, semantic and RPN loss falls
    and their sum drops below 0.3x in 15 steps. 16 RoIs per image from 64 proposals keep the steps cheap: the
    mask heads run on every positive RoI, six head passes a step with the information flow."""
    model = detector("htc", 3, box_batch_size_per_image=16, rpn_post_nms_top_n_train=64)
    x, t = images(), targets(semantic=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9)
    history = []
    for _ in range(15):
        losses = model(x, t)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)  # no warm-up in so short a run
        optimizer.step()
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.3 * sum(first.values())
    for key in first:
        if key.endswith("loss_box_reg"):
            # The regression losses are sums over the positive RoIs divided by all sampled RoIs: at initialisation
            # few proposals pass IoU 0.5 / 0.6 / 0.7 (at 0.6 / 0.7 only the ground truth, zero targets); as the RPN
            # learns more pass, and these sums grow. They stay bounded.
            assert last[key] < 0.5, (key, last[key])
        else:
            assert last[key] < first[key], (key, first[key], last[key])


BACKBONE_OPS = {"resnet_tiny": torch.nn.Conv2d, "sa_resnet_tiny": SelfAttention2d,
                "aa_resnet_tiny": AttentionAugmentedConv2d, "static_lesa_resnet_tiny": LESA2d}


@pytest.mark.parametrize("backbone", list(BACKBONE_OPS))
def test_every_backbone_in_every_detector(backbone):
    """Each tiny model as the backbone of each mask detector: its own operation in the backbone's stages 3-4,
    finite losses, and a gradient that reaches that operation's weights."""
    for kind in ("maskrcnn", "cascade_maskrcnn", "htc"):
        model = detector(kind, backbone=backbone)
        body = model.backbone.body
        ops = [body.layer3[1].conv2, body.layer4[1].conv2]
        assert all(type(op) is BACKBONE_OPS[backbone] for op in ops), (kind, backbone)
        if backbone.startswith("static_lesa"):
            assert all(op.fusion_gate is None for op in ops)  # the static fusion
        losses = model(images([(64, 96)]), targets([(64, 96)]))
        assert all(torch.isfinite(v) for v in losses.values()), (kind, backbone)
        sum(losses.values()).backward()
        for op in ops:
            projection = op if isinstance(op, torch.nn.Conv2d) else op.qkv if isinstance(op, AttentionAugmentedConv2d) \
                else op.binary.qkv
            weight = projection.weight
            assert weight.grad is not None and float(weight.grad.abs().sum()) > 0, (kind, backbone)


def test_builders_decide_freezing_from_the_weights(tmp_path):
    scratch = build_maskrcnn("lesa_resnet_tiny", 3)
    body = scratch.backbone.body
    assert body.conv1.weight.requires_grad and all(p.requires_grad for p in body.layer1.parameters())
    scratch.train()
    assert all(m.training for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.save({"model": body.state_dict()}, tmp_path / "w.pt")
    trained = build_maskrcnn("lesa_resnet_tiny", 3, pretrained_backbone=tmp_path / "w.pt")
    assert not trained.backbone.body.conv1.weight.requires_grad
    with pytest.raises(TypeError):
        build_detector("htc", "lesa_resnet_tiny", 3, None)  # keyword-only after num_classes


@pytest.mark.parametrize("backbone", [None, 3, torch.nn.Conv2d(3, 8, 3)])
def test_a_backbone_that_is_not_a_name_is_one_config_error(backbone):
    """build_detector("fasterrcnn", None, 3) or a module as backbone (was: AttributeError) is the ConfigError its
    docstring promises, naming the valid names."""
    with pytest.raises(ConfigError, match=r"^backbone must be a lesa model name \(a string\), got .*; choose one "
                                          r"of .*lesa_resnet50, lesa_resnet_tiny") as info:
        build_detector("fasterrcnn", backbone, 3)
    assert "\n" not in str(info.value)
    assert ("a module is not taken" in str(info.value)) == isinstance(backbone, torch.nn.Module)


def test_multi_scale_resize_keeps_the_aspect_and_resizes_semantic_maps():
    transform = DetectionTransform(100, 100, [0.5] * 3, [0.5] * 3, train_scales=[[0.5, 60, 80], [0.5, 120, 140]])
    transform.train()
    image, target = torch.rand(3, 50, 100), targets([(50, 100)], semantic=True)[0]
    longs = set()
    for _ in range(20):
        batch, out = transform([image], [dict(target)])
        h, w = batch.image_sizes[0]
        assert 60 <= w <= 80 or 120 <= w <= 140
        assert abs(h / w - 0.5) < 0.03 and out[0]["semantic"].shape == (h, w)
        longs.add(w)
    assert min(longs) <= 80 < 120 <= max(longs)  # both ranges drawn
    transform.eval()
    assert transform([image])[0].image_sizes[0] == (50, 100)  # evaluation: the fixed size


def test_presets_and_options():
    cfg = build_det_config(None, preset="htc")
    assert (cfg.detector, cfg.schedule, cfg.backbone, cfg.total_epochs()) == ("htc", "20e", "lesa_wide_resnet50_2", 20)
    assert cfg.train_scales == [[0.5, 512, 1024], [0.5, 1024, 2048]] and cfg.deform_unary
    with pytest.raises(ValueError, match="needs the COCO-stuff maps"):
        build_det_config(None, detector="htc", semantic=True, data="/data/coco")
    assert not build_det_config(None, detector="htc", data="/data/coco").with_semantic  # htc_without_semantic
    assert build_det_config(None, detector="htc").with_semantic  # digit scenes make their maps


def test_output_names_do_not_collide():
    assert output_names(["a/x.jpg", "b/x.png", "c/y.png"]) == ["a_x.png", "b_x.png", "y.png"]
    assert len(set(output_names(["x.png", "x.png"]))) == 2


def test_htc_commands_end_to_end(tmp_path, capsys):
    root = ensure_digit_scenes(tmp_path / "scenes", counts={"train": 4, "val": 2})
    out = tmp_path / "htc"
    assert main(["det", "train", "--detector", "htc", "--data", str(root), "--epochs", "1", "--batch-size", "2",
                 "--min-size", "128", "--max-size", "160", "--semantic-root", "instances", "--output", str(out),
                 "--quiet"]) == 0
    rows = read_metrics_csv(out / "metrics.csv")
    assert "loss_semantic" in rows[0] and "s2.loss_mask" in rows[0]
    assert json.loads((out / "summary.json").read_text())["kind"] == "detection"
    assert main(["det", "eval", "--checkpoint", str(out)]) == 0  # the detector kind comes from the run
    assert "segm" in capsys.readouterr().out
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "s.png").write_bytes((root / "val" / "00001.png").read_bytes())
    assert main(["det", "predict", str(tmp_path / "a" / "s.png"), str(tmp_path / "b" / "s.png"), "--checkpoint",
                 str(out), "--output", str(tmp_path / "pred")]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [".lesa", "a_s.png", "b_s.png"]
