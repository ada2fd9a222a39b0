"""Weights from wrapped models and fine-tuning: the key prefixes of torch.compile / DDP / Lightning through every
reader, another class count (lesa and timm), flat position tables resized, and `lesa train --init`."""
import json
import math
import re

import pytest
import timm
import torch
from helpers import cli, image_folder

from lesa.classification import ClassificationTask, build_config, load_trained_model
from lesa.cli import main
from lesa.convert import save_state_dict
from lesa.detection import build_detector
from lesa.engine.distributed import DistContext
from lesa.engine.records import read_metrics_csv
from lesa.errors import CheckpointError, ConfigError
from lesa.models import create_model
from lesa.models.pos_embed import resize_flat_table
from lesa.weights import load_weights, read_checkpoint

MODEL = "lesa_resnet_tiny"  # 'flat' position tables, ten classes, 32 px


def same_weights(model, sd, skip=()) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith(skip))


# -- key prefixes of wrapped models ---------------------------------------------------------------------
@pytest.mark.parametrize("prefix, suffix", [("_orig_mod.", ".pt"), ("module.", ".pth"),
                                            ("module._orig_mod.", ".safetensors"), ("_orig_mod.module.", ".pt")])
def test_wrapped_model_weights_load_through_every_reader(tmp_path, prefix, suffix):
    torch.manual_seed(0)
    sd = create_model(MODEL).state_dict()
    path = str(tmp_path / f"weights{suffix}")
    save_state_dict({prefix + k: v for k, v in sd.items()}, path)
    said = pytest.warns(UserWarning, match=re.escape(f"removed the key prefix '{prefix}'"))
    with said:
        assert same_weights(load_weights(create_model(MODEL), path), sd)
    with said:
        assert same_weights(create_model(MODEL, checkpoint_path=path), sd)
    with said:  # the reader of lesa eval / analyze / export
        assert same_weights(load_trained_model(path, MODEL)[0], sd)
    with said:
        assert same_weights(timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=path)), sd)
    with said:
        assert main(["convert", path, str(tmp_path / "plain.pt"), "--model", MODEL]) == 0
    assert read_checkpoint(tmp_path / "plain.pt").keys() == sd.keys()
    with said:
        detector = build_detector("maskrcnn", MODEL, 3, pretrained_backbone=path, min_size=64, max_size=64)
    body = detector.backbone.body.state_dict()
    assert "not in the backbone" not in detector.backbone_init
    loaded = [k for k in body if k not in detector.backbone_init["newly initialised"]]
    assert len(loaded) > 100 and all(torch.equal(body[k], sd[k]) for k in loaded)


def test_eval_reads_a_training_checkpoint_of_a_compiled_ddp_model(tmp_path, capsys):
    torch.manual_seed(0)
    sd = create_model(MODEL).state_dict()
    classes = ["ant", "bee", "cow", *(str(i) for i in range(7))]  # the run's ten; the folder holds three of them
    state = dict(model={"_orig_mod.module." + k: v for k, v in sd.items()}, epoch=1, kind="classification",
                 config=dict(model=MODEL, model_kwargs={}, data="digits", img_size=32), classes=classes)
    torch.save(state, tmp_path / "best.pt")
    data = str(image_folder(tmp_path / "data", classes=("ant", "bee", "cow")))
    with pytest.warns(UserWarning, match="removed the key prefix '_orig_mod.module.'"):
        assert main(["eval", "--checkpoint", str(tmp_path), "--data", data, "--quiet"]) == 0
    assert "(6 images)" in capsys.readouterr().out


def test_a_lightning_checkpoint_loads_without_its_attribute_prefix(tmp_path, digits_run):
    state = torch.load(digits_run / "best.pt", weights_only=True)["model"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3,
                "pytorch-lightning_version": "2.4.0"}, tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="removed the key prefix 'model.'"):
        assert cli("eval", "--checkpoint", tmp_path / "last.ckpt", "--model", "resnet_tiny", "--data", "digits",
                   "--quiet")[0] == 0
    torch.save({"state_dict": {f"net.body.{k}": v for k, v in state.items()}}, tmp_path / "other.ckpt")
    code, err = cli("eval", "--checkpoint", tmp_path / "other.ckpt", "--model", "resnet_tiny")
    assert code == 2 and "every key starts with 'net.'" in err


# -- another class count ----------------------------------------------------------------------------------
def test_another_num_classes_reinitialises_the_classifier_alone(tmp_path):
    torch.manual_seed(0)
    sd = create_model(MODEL).state_dict()  # ten classes
    path = str(tmp_path / "ten.pt")
    torch.save(sd, path)
    said = pytest.warns(UserWarning, match="classifier re-initialised for 4 classes, the checkpoint's has 10")
    with said:
        model = create_model(MODEL, num_classes=4, checkpoint_path=path)
    with said:
        timm_model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=4)
    for m in (model, timm_model):
        assert same_weights(m, sd, skip=("fc.",)) and not torch.equal(m.fc.weight, sd["fc.weight"][:4])
        assert m.fc.weight.shape == (4, 512) and m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    # without num_classes the sizes must agree, and the error says how to go on
    torch.save(model.state_dict(), tmp_path / "four.pt")
    with pytest.raises(CheckpointError, match=r"classifier has 4 classes .* num_classes=4, or pass num_classes=10"):
        create_model(MODEL, checkpoint_path=str(tmp_path / "four.pt"))
    # any other mismatch stays an error, with its own fix
    with pytest.raises(CheckpointError, match=r"rel_pos\.relative.*from 29 to 32: .* resize the tables") as info:
        create_model(MODEL, num_classes=4, img_size=48, checkpoint_path=path)
    assert "fc.weight" not in str(info.value)
    with pytest.raises(ConfigError, match=r"only, not lesa_resnet50.*pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("lesa_resnet50", pretrained=True)


# -- 'flat' tables at another size ------------------------------------------------------------------------
def test_flat_tables_resize_through_their_2d_view():
    table = torch.randn(5, 2 * 64 - 1)  # 8x8 maps; raster offset o at index o + 63
    assert torch.equal(resize_flat_table(table, 8, 8), table)
    small = resize_flat_table(table, 8, 4)  # 4x4 maps: offsets -15..15 at index o + 15
    assert small.shape == (5, 31)
    torch.testing.assert_close(small[:, 15], table[:, 63])  # o = 0 is (0, 0) alone
    # o = 1 is (dy, dx) = (0, 1) or (1, -3) in a 4x4 map: 8x8 offsets 1 and 8 - 3
    torch.testing.assert_close(small[:, 16], (table[:, 64] + table[:, 68]) / 2)
    assert resize_flat_table(table, 8, (12, 10)).shape == (5, 2 * 120 - 1)


# -- lesa train --init ----------------------------------------------------------------------------------
def test_train_init_fine_tunes_a_digits_run_on_new_classes_and_size(tmp_path, capsys):
    run, tuned = str(tmp_path / "digits"), str(tmp_path / "tuned")
    data = str(image_folder(tmp_path / "data", classes=("ant", "bee", "cow")))
    # heads=4 is not the default: the fine-tuning run must take it from the checkpoint's run
    assert main(["train", "--heads", "4", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16",
                 "--output", run, "--quiet"]) == 0
    trained = read_checkpoint(run)["model"]

    cfg = build_config(init=run, data=data, img_size=48, output=tuned, quiet=True)
    assert (cfg.model, cfg.model_kwargs["heads"]) == (MODEL, 4)
    with pytest.warns(UserWarning) as notes:
        model = ClassificationTask(cfg, DistContext()).model
    said = " ".join(str(w.message) for w in notes)
    assert "classifier re-initialised for 3 classes" in said
    assert "position tables resized from the checkpoint's 32 px input to 48 px" in said
    tables = {k for k in trained if k.endswith("rel_pos.relative")}
    assert len(tables) == 3 and same_weights(model, {k: v for k, v in trained.items() if k not in tables},
                                             skip=("fc.",))
    assert model.fc.weight.shape == (3, 512)
    for key in tables:
        torch.testing.assert_close(model.state_dict()[key], resize_flat_table(trained[key], 8, 12))
    # a weights file has no run: the model and its options are given, the rest is alike
    save_state_dict(trained, str(tmp_path / "weights.safetensors"))
    cfg = build_config(init=str(tmp_path / "weights.safetensors"), heads=4, data=data, img_size=48, output=tuned)
    with pytest.warns(UserWarning):
        assert same_weights(ClassificationTask(cfg, DistContext()).model, model.state_dict(), skip=("fc.",))

    with pytest.warns(UserWarning):  # the two notes above
        assert main(["train", "--init", run, "--data", data, "--img-size", "48", "--epochs", "1",
                     "--max-steps-per-epoch", "1", "--batch-size", "2", "--output", tuned, "--quiet"]) == 0
    rows = read_metrics_csv(f"{tuned}/metrics.csv")
    assert [r["epoch"] for r in rows] == [1] and math.isfinite(rows[0]["train_loss"])
    assert json.loads((tmp_path / "tuned" / "summary.json").read_text())["classes"] == ["ant", "bee", "cow"]

    for extra, message in ((["--model", "sa_resnet_tiny"], "--model sa_resnet_tiny contradicts --init"),
                           (["--resume"], "--init and --resume exclude each other")):
        assert main(["train", "--init", run, "--data", data, "--output", str(tmp_path / "no"), *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_checkpoint_name_the_system_refuses_is_one_line(tmp_path, capsys):
    too_long = str(tmp_path / ("n" * 300))
    assert main(["train", "--init", too_long, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lesa train: error: --init: {too_long} cannot be read (File name too long)")
    assert len(err.strip().splitlines()) == 1
