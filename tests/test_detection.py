"""Mask R-CNN with LESA backbones: features, DCN, initialisation, COCO I/O and evaluation, the commands and their
options."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import cli

from lesa.cli import main
from lesa.data.coco import CocoDetection, encode_mask, write_coco
from lesa.data.digit_scenes import ensure_digit_scenes
from lesa.detection import build_backbone, build_maskrcnn, load_backbone_weights
from lesa.detection.config import DetConfig
from lesa.detection.evaluate import coco_evaluate, to_coco_results
from lesa.engine.records import read_metrics_csv
from lesa.layers import DeformConv2dPack, LESA2d
from lesa.layers.rel_pos import resize_rel_table
from lesa.models import create_model

pytest.importorskip("pycocotools")


def test_backbone_levels_on_a_non_square_image():
    backbone = build_backbone("lesa_resnet_tiny", table_size=128).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 96, 160))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    assert all(f.shape[1] == backbone.out_channels == 256 for f in features.values())
    # LESA in stages 3-4, the last stage's first block at stride 2 (the detection layout)
    assert isinstance(backbone.body.layer4[0].conv2, LESA2d) and backbone.body.layer4[0].conv2.stride == 2


def test_frozen_stem_first_stage_and_batch_norm():
    backbone = build_backbone("lesa_resnet_tiny", trainable_layers=3)
    backbone.train()
    assert not backbone.body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in backbone.body.layer1.parameters())
    assert backbone.body.layer2[0].conv1.weight.requires_grad
    bns = [m for m in backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    assert backbone.fpn.training


def test_deformable_convolutions():
    backbone = build_backbone("lesa_resnet_tiny", dcn_stages=(2, 3, 4), deform_unary=True, table_size=64)
    body = backbone.body
    assert all(isinstance(block.conv2, DeformConv2dPack) for block in body.layer2)
    assert isinstance(body.layer3[0].conv2, DeformConv2dPack)  # the stride-2 conv block of stage 3
    assert all(isinstance(m.unary.conv, DeformConv2dPack) for m in body.modules() if isinstance(m, LESA2d))
    out = backbone(torch.randn(2, 3, 64, 96))
    sum(f.mean() for f in out.values()).backward()
    for offsets in (body.layer2[0].conv2.conv_offset, body.layer3[1].conv2.unary.conv.conv_offset):
        assert offsets.weight.grad is not None and float(offsets.weight.grad.abs().sum()) > 0  # the offsets learn
    with pytest.raises(ValueError, match="deform_unary needs a LESA backbone"):
        build_backbone("sa_resnet_tiny", deform_unary=True)


def detection_targets(sizes, num_classes=3):
    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    for h, w in sizes:
        images.append(torch.rand(3, h, w, generator=gen))
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:50, 20:70] = 1
        masks[1, h // 2 : h // 2 + 30, w // 3 : w // 3 + 25] = 1
        boxes = torch.tensor([[20, 10, 70, 50], [w // 3, h // 2, w // 3 + 25, h // 2 + 30]], dtype=torch.float32)
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, num_classes - 1]), masks=masks))
    return images, targets


def test_lesa_r50_fpn_mask_rcnn_trains_on_mixed_non_square_images_and_predicts():
    """A training step on two images of different aspect ratios gives every loss, finite and positive, and
    gradients that reach the LESA layers; in eval mode each image's detections are in its own coordinates:
    boxes inside the image, labels among the classes, scores in decreasing order, each mask the image's size
    and pasted inside its box."""
    torch.manual_seed(0)
    model = build_maskrcnn("lesa_resnet50", num_classes=3, min_size=128, max_size=192,
                           box_batch_size_per_image=64)
    images, targets = detection_targets([(160, 224), (200, 120)])
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    lesa_layer = model.backbone.body.layer3[1].conv2
    assert isinstance(lesa_layer, LESA2d)
    for weight in (lesa_layer.binary.qkv.weight, lesa_layer.binary.rel_pos.height, lesa_layer.unary.conv.weight):
        assert weight.grad is not None and float(weight.grad.abs().sum()) > 0
    model.eval()
    model.roi_heads.score_thresh = 0.0  # every detection of the random heads, not only confident ones
    with torch.no_grad():
        predictions = model(images)
    assert len(predictions) == 2
    for image, pred in zip(images, predictions):
        height, width = image.shape[-2:]
        boxes, masks = pred["boxes"], pred["masks"]
        assert set(pred) >= {"boxes", "labels", "scores", "masks"} and len(boxes) > 0
        assert masks.shape == (len(boxes), 1, height, width)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert set(pred["labels"].tolist()) <= {1, 2} and (pred["scores"][:-1] >= pred["scores"][1:]).all()
        for (x1, y1, x2, y2), mask in zip(boxes.tolist(), masks[:, 0]):
            ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
            if len(xs):  # the 28x28 mask is pasted over its box grown by 2/28 (torchvision's border)
                mx, my = 0.1 * (x2 - x1) + 1, 0.1 * (y2 - y1) + 1
                assert x1 - mx <= xs.min() and xs.max() <= x2 + mx and y1 - my <= ys.min() and ys.max() <= y2 + my


def test_backbone_initialisation_from_a_classification_checkpoint(tmp_path):
    torch.manual_seed(0)
    cls = create_model("lesa_resnet_tiny", num_classes=10, pos_embed="rel2d", img_size=(64, 64))
    ckpt = tmp_path / "cls.pt"
    torch.save({"model": cls.state_dict(), "config": {"img_size": 64}}, ckpt)

    backbone = build_backbone("lesa_resnet_tiny", table_size=128)
    report = load_backbone_weights(backbone, ckpt, pos_init="interpolate")
    assert set(report["classifier"]) == {"fc.weight", "fc.bias"}
    body = backbone.body.state_dict()
    # the stem differs (3x3/1 for 32x32 classification vs 7x7/2 for detection): reported, not loaded
    assert any(k.startswith("conv1.weight") for k in report["shape mismatch"])
    qkv = "layer3.1.conv2.binary.qkv.weight"
    torch.testing.assert_close(body[qkv], cls.state_dict()[qkv])
    # stage 3: 16x16 maps (64 px, stride-1 stem) -> 8x8 (128 px at stride 16); stage 4 blocks 2+: 16 -> 4
    for key, length in (("layer3.1.conv2.binary.rel_pos.height", 8), ("layer4.1.conv2.binary.rel_pos.width", 4)):
        torch.testing.assert_close(body[key], resize_rel_table(cls.state_dict()[key], length))

    fresh = build_backbone("lesa_resnet_tiny", table_size=128)
    report = load_backbone_weights(fresh, ckpt, pos_init="reinit")
    assert any("rel_pos.height" in k for k in report["position tables (re-initialised)"])
    flat = tmp_path / "flat.pt"
    torch.save({"model": create_model("lesa_resnet_tiny", num_classes=10).state_dict()}, flat)
    report = load_backbone_weights(build_backbone("lesa_resnet_tiny"), flat)
    assert any("bn_logits" in k for k in report["shape mismatch"])  # 3 logit terms (flat) vs 2 (rel2d)
    with pytest.raises(ValueError, match="needs 'rel2d' tables"):
        load_backbone_weights(build_backbone("lesa_resnet_tiny"), flat, pos_init="interpolate")


def write_sample_coco(tmp_path):
    """Two images, category ids 3 and 7 (not contiguous), one polygon and two RLE masks."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in (1, 2):
        Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    square = np.zeros((30, 40), dtype=np.uint8)
    square[5:15, 10:30] = 1
    blob = np.zeros((30, 40), dtype=np.uint8)
    blob[20:28, 2:9] = 1
    anns = [
        dict(id=1, image_id=1, category_id=7, iscrowd=0, bbox=[10, 5, 20, 10], area=200,
             segmentation=[[10, 5, 30, 5, 30, 15, 10, 15]]),
        dict(id=2, image_id=1, category_id=3, iscrowd=0, bbox=[2, 20, 7, 8], area=56, segmentation=encode_mask(blob)),
        dict(id=3, image_id=2, category_id=3, iscrowd=0, bbox=[10, 5, 20, 10], area=200,
             segmentation=encode_mask(square)),
    ]
    images = [dict(id=i, file_name=f"{i}.png", height=30, width=40) for i in (1, 2)]
    write_coco(tmp_path / "ann.json", images, anns, [dict(id=3, name="three"), dict(id=7, name="seven")])
    return square, blob


def test_coco_writer_reader_round_trip_and_perfect_evaluation(tmp_path):
    square, blob = write_sample_coco(tmp_path)
    data = CocoDetection(tmp_path / "ann.json", tmp_path / "img")
    assert data.classes == ["three", "seven"] and data.category_ids == [3, 7]
    image, target = data[0]
    assert image.shape == (3, 30, 40) and target["labels"].tolist() == [2, 1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 5, 30, 15], [2, 20, 9, 28]]))
    assert target["masks"][0].sum() >= square.sum()  # polygon rasterised (its border included)
    assert torch.equal(target["masks"][1], torch.from_numpy(blob))
    # ground truth as predictions scores 100 AP
    results = {"bbox": [], "segm": []}
    for i in range(len(data)):
        _, t = data[i]
        pred = dict(boxes=t["boxes"], labels=t["labels"], scores=torch.ones(len(t["labels"])),
                    masks=t["masks"][:, None].float())
        bbox, segm = to_coco_results(data, int(t["image_id"]), pred)
        results["bbox"] += bbox
        results["segm"] += segm
    assert {r["category_id"] for r in results["bbox"]} == {3, 7}
    stats = coco_evaluate(data, results)
    assert stats["bbox"]["AP"] == pytest.approx(100) and stats["segm"]["AP"] == pytest.approx(100)
    # size ranges without ground truth are undefined (pycocotools' -1), not a zero AP
    assert stats["bbox"]["APl"] is None and stats["bbox"]["APs"] == pytest.approx(100)
    assert coco_evaluate(data, {"bbox": [], "segm": []})["bbox"]["AP"] == 0


def test_digit_scenes_are_deterministic_coco(tmp_path):
    a = ensure_digit_scenes(tmp_path / "a", counts={"train": 3, "val": 2})
    b = ensure_digit_scenes(tmp_path / "b", counts={"train": 3, "val": 2})
    assert (a / "train.json").read_text() == (b / "train.json").read_text()
    data = CocoDetection(a / "train.json", a / "train", train=False)
    sizes = set()
    for i in range(len(data)):
        image, target = data[i]
        sizes.add(tuple(image.shape[-2:]))
        assert 2 <= len(target["labels"]) <= 6 and target["labels"].min() >= 1 and target["labels"].max() <= 10
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert len(sizes) == 3


def test_det_defaults_depend_on_the_data():
    scenes, coco = DetConfig(), DetConfig(data="/data/coco", min_size=640)
    assert (scenes.batch_size, scenes.min_size, scenes.max_size, scenes.box_batch_size_per_image) == (4, 320, 512, 128)
    assert (coco.batch_size, coco.min_size, coco.max_size, coco.box_batch_size_per_image) == (2, 640, 1333, 512)
    assert coco.rpn_post_nms_top_n_train == 2000


def test_det_commands_end_to_end(tmp_path, capsys):
    root = ensure_digit_scenes(tmp_path / "scenes", counts={"train": 4, "val": 2})
    out = tmp_path / "run"
    args = ["det", "train", "--data", str(root), "--epochs", "1", "--batch-size", "2", "--min-size", "128",
            "--max-size", "192", "--output", str(out), "--quiet"]
    assert main(args) == 0
    stats = json.loads((out / "coco_eval.json").read_text())
    assert set(stats) == {"bbox", "segm", "categories", "data", "skipped_images"} and stats["skipped_images"] == []
    assert set(stats["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert [c["name"] for c in stats["categories"]] == [str(d) for d in range(10)]  # the run's mapping
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "summary.json"):
        assert (out / name).is_file(), name
    assert main(["det", "eval", "--checkpoint", str(out)]) == 0
    assert "segm" in capsys.readouterr().out
    assert main(["det", "predict", str(root / "val" / "00001.png"), "--checkpoint", str(out),
                 "--output", str(tmp_path / "pred"), "--score-threshold", "0.0"]) == 0
    assert (tmp_path / "pred" / "00001.png").is_file()
    assert main([*args[:-3], "--output", str(out), "--quiet"]) == 2  # the run is not overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args[:3], str(root), "--epochs", "2", *args[6:], "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics_csv(out / "metrics.csv")] == [1, 2]


def test_det_train_with_two_cpu_processes(tmp_path):
    root = ensure_digit_scenes(tmp_path / "scenes", counts={"train": 4, "val": 2})
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lesa",
           "det", "train", "--data", str(root), "--epochs", "1", "--batch-size", "1", "--min-size", "128",
           "--max-size", "160", "--output", str(out), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    evaluation = json.loads((out / "coco_eval.json").read_text())
    assert set(evaluation) == {"bbox", "segm", "categories", "data", "skipped_images"}


def test_det_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    import signal
    import time

    from lesa.engine import read_metrics_csv

    root = ensure_digit_scenes(tmp_path / "scenes", counts={"train": 4, "val": 1})
    args = [sys.executable, "-m", "lesa", "det", "train", "--data", str(root), "--epochs", "2", "--batch-size", "2",
            "--min-size", "96", "--max-size", "128", "--seed", "5", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the uninterrupted run beside the killed one: one thread each, the two cores busy
    uninterrupted = subprocess.Popen([*args, "--output", str(straight)], env=env)
    proc = subprocess.Popen([*args, "--output", str(killed)], env=env)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] < 2, "finished before it could be killed"
    assert uninterrupted.wait() == 0
    subprocess.run([*args, "--output", str(killed), "--resume"], check=True, env=env)
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    rows_a, rows_b = read_metrics_csv(straight / "metrics.csv"), read_metrics_csv(killed / "metrics.csv")
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a], rel=1e-5)


def test_det_options_are_validated(tmp_path):
    code, err = cli("det", "train", "--lr", "-1", "--output", tmp_path / "r", "--quiet")
    assert code == 2 and "--lr: got -1.0; use a value > 0" in err
    code, err = cli("det", "train", "--dcn-stages", "5", "--output", tmp_path / "r", "--quiet")
    assert code == 2 and "--dcn-stages[0]: got 5; use a value <= 4" in err
    assert not (tmp_path / "r").exists()


def test_a_detector_given_no_images_says_so():
    from lesa.detection.detectors import build_detector
    from lesa.errors import InputError

    model = build_detector("maskrcnn", "resnet_tiny", 3, min_size=64, max_size=64).eval()
    with pytest.raises(InputError, match="one or more images"):
        model([])
