"""Reading weights and checkpoints (lesa.weights, through every reader: the Python API and each command): a bad
file is one line naming it and the fix, and a pickled payload never runs; weights of another dtype kind are
refused and half precision converts; a run of the other task is named with the command that takes it."""
import os
import random
from pathlib import Path

import pytest
import torch
from helpers import cli
from PIL import Image

from lesa import create_model, load_weights
from lesa.errors import CheckpointError

QUICK = ["--batch-size", "16", "--max-steps-per-epoch", "2", "--quiet"]


class CarriesCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_file(kind: str, path: Path, good: Path) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    else:  # code-carrying
        CarriesCode.marker = str(path.parent / "pwned")
        torch.save({"model": CarriesCode(), "epoch": 1}, path)
    return path


BAD_KINDS = ["empty", "truncated", "random", "code"]
READERS = ["load_weights", "create_model", "eval", "analyze", "convert", "det eval", "det predict", "train --resume",
           "det train --resume", "--pretrained-backbone"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_checkpoint_reader_reports_a_bad_file_in_one_line(tmp_path, digits_run, digit_scenes, kind, reader):
    run = tmp_path / "run"
    run.mkdir()
    bad = bad_file(kind, run / "last.pt", digits_run / "last.pt")
    if reader in ("load_weights", "create_model"):
        with pytest.raises(CheckpointError) as info:
            if reader == "load_weights":
                load_weights(create_model("resnet_tiny"), bad)
            else:
                create_model("resnet_tiny", checkpoint_path=str(bad))
        message = str(info.value)
    else:
        image = tmp_path / "scene.png"
        Image.new("RGB", (64, 48)).save(image)
        args = {
            "eval": ["eval", "--checkpoint", bad, "--model", "resnet_tiny"],
            "analyze": ["analyze", bad],
            "convert": ["convert", bad, tmp_path / "out.pt"],
            "det eval": ["det", "eval", "--checkpoint", bad],
            "det predict": ["det", "predict", image, "--checkpoint", bad, "--output", tmp_path / "pred"],
            "train --resume": ["train", "--model", "resnet_tiny", *QUICK, "--output", run, "--resume"],
            "det train --resume": ["det", "train", "--data", digit_scenes, "--output", run, "--resume", "--quiet"],
            "--pretrained-backbone": ["det", "train", "--data", digit_scenes, "--backbone", "resnet_tiny", "--output",
                                      tmp_path / "det", "--pretrained-backbone", bad, "--quiet"],
        }[reader]
        code, message = cli(*args)
        assert code == 2
    assert str(bad) in message
    assert "weights_only=False" not in message
    expected = {"empty": "is empty", "truncated": "truncated or corrupt", "random": "not a torch checkpoint",
                "code": "pickled Python objects"}[kind]
    assert expected in message, message
    assert not (tmp_path / "run" / "pwned").exists()  # the pickled command never ran
    assert bad.exists() and not (tmp_path / "out.pt").exists()


def test_integer_weights_are_refused_and_half_precision_converts(tmp_path):
    from safetensors.torch import save_file

    model = create_model("resnet_tiny")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({k: (v * 100).to(torch.int64) if v.is_floating_point() else v for k, v in sd.items()},
              str(tmp_path / "int.safetensors"))
    code, err = cli("eval", "--checkpoint", tmp_path / "int.safetensors", "--model", "resnet_tiny")
    assert code == 2 and "dtype" in err and "conv1.weight: checkpoint torch.int64 vs model torch.float32" in err
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(tmp_path / "half.safetensors"))
    loaded = load_weights(create_model("resnet_tiny"), tmp_path / "half.safetensors")
    torch.testing.assert_close(loaded.conv1.weight, sd["conv1.weight"].half().float())


def fake_detection_run(path: Path) -> Path:
    path.mkdir(parents=True)
    torch.save({"kind": "detection", "model": {}, "epoch": 1, "config": {"backbone": "lesa_resnet_tiny"}},
               path / "best.pt")
    return path


def test_a_run_of_the_other_kind_is_named(tmp_path, digits_run, digit_scenes):
    for args in (["det", "eval", "--checkpoint", digits_run],
                 ["det", "predict", digit_scenes / "val" / "00000.png", "--checkpoint", digits_run, "--output",
                  tmp_path]):
        code, err = cli(*args)
        assert code == 2 and "is a classification run" in err and "lesa eval" in err
    det = fake_detection_run(tmp_path / "det")
    for args in (["eval", "--checkpoint", det], ["analyze", det]):
        code, err = cli(*args)
        assert code == 2 and "is a detection run" in err and "lesa det eval" in err
    code, err = cli("det", "train", "--data", digit_scenes, "--output", tmp_path / "d2", "--pretrained-backbone",
                    det / "best.pt", "--quiet")
    assert code == 2 and "is a detection run: --pretrained-backbone takes a classification checkpoint" in err


# -- what a file records builds the model it fits -------------------------------------------------------------
def test_a_file_that_records_its_run_builds_the_model_at_its_input_size(tmp_path, digits_run):
    from lesa.convert import save_state_dict

    trained = create_model("lesa_resnet_tiny", img_size=24, num_classes=3, heads=4)
    described = tmp_path / "w.safetensors"
    save_state_dict(trained.state_dict(), str(described), {"model": "lesa_resnet_tiny", "img_size": 24,
                                                          "classes": ["a", "b", "c"], "model_kwargs": {"heads": 4}})
    model = create_model("lesa_resnet_tiny", checkpoint_path=str(described))
    assert (model.img_size, model.num_classes) == ((24, 24), 3)
    x = torch.randn(1, 3, 24, 24)
    assert torch.equal(model.eval()(x), trained.eval()(x))
    # the shipped weights by name, as pretrained=True gives them; the same built on the meta device
    shipped = create_model("lesa_resnet_tiny", checkpoint_path="lesa_resnet_tiny.fashion_mnist")
    on_meta = create_model("lesa_resnet_tiny", pretrained=True, device="meta")
    x = torch.randn(1, 3, 28, 28)
    assert shipped.img_size == (28, 28) and torch.equal(shipped.eval()(x), on_meta.eval()(x))
    assert on_meta.conv1.weight.dtype == torch.float32  # the model's dtype, not the file's float16
    # a run directory records its model too: another model is named with the one that fits
    with pytest.raises(CheckpointError, match="holds a resnet_tiny .* create_model\\('resnet_tiny'"):
        create_model("lesa_resnet_tiny", checkpoint_path=str(digits_run))


def test_a_misfit_says_which_options_fit(tmp_path):
    bare = tmp_path / "w.pt"
    torch.save(create_model("lesa_resnet_tiny", img_size=24).state_dict(), bare)
    with pytest.raises(CheckpointError) as raised:
        create_model("lesa_resnet_tiny", checkpoint_path=str(bare))
    message = str(raised.value)
    # the tables fix the feature map (6 x 6 at stride 4), not the input: the sizes that give that map
    assert "trained at an img_size from 21 to 24: build the model with img_size=24" in message
    assert "classes" not in message
    assert create_model("lesa_resnet_tiny", img_size=24, checkpoint_path=str(bare)).img_size == (24, 24)
    with pytest.raises(CheckpointError, match="are 'flat' ones: build the model with pos_embed='flat'"):
        create_model("lesa_resnet_tiny", img_size=24, pos_embed="rel2d", checkpoint_path=str(bare))
    with pytest.raises(CheckpointError, match="weights are of another model") as raised:
        create_model("resnet_tiny", checkpoint_path=str(bare))
    assert "position" not in str(raised.value)
    # the command line reads the options off the tensors of a bare file: no flag to guess
    code, err = cli("eval", "--checkpoint", bare, "--model", "lesa_resnet_tiny", "--data", "digits", "--quiet")
    assert code == 0, err


def test_files_that_are_no_weights_are_named_with_what_they_hold(tmp_path):
    listed, junk = tmp_path / "list.pt", tmp_path / "junk.pt"
    torch.save([1, 2], listed)
    junk.write_bytes(b"x" * 101)
    assert cli("eval", "--checkpoint", listed, "--model", "resnet_tiny")[1].endswith(
        f"{listed}: a checkpoint must hold a dict of tensors, got list")
    assert "its 101 bytes start with b'xxxxxxxx'" in cli("eval", "--checkpoint", junk, "--model", "resnet_tiny")[1]
    weights = tmp_path / "w.safetensors"
    from lesa.convert import save_state_dict

    save_state_dict(create_model("resnet_tiny").state_dict(), str(weights))
    code, err = cli("det", "eval", "--checkpoint", weights)
    assert code == 2 and "holds weights only" in err and "pass the run's directory, or its last.pt" in err


def test_a_file_that_records_its_model_is_not_loaded_as_another(tmp_path, digits_run, digit_scenes):
    code, err = cli("eval", "--checkpoint", digits_run, "--model", "sa_resnet_tiny", "--data", "digits")
    assert code == 2 and "holds a resnet_tiny (the file records it), not a sa_resnet_tiny: drop --model" in err
    code, err = cli("det", "train", "--data", digit_scenes, "--backbone", "lesa_resnet_tiny", "--pretrained-backbone",
                    digits_run, "--output", tmp_path / "det", "--quiet")
    assert code == 2 and "not the backbone lesa_resnet_tiny: pass --backbone resnet_tiny" in err


def test_bare_weights_show_their_heads(tmp_path):
    from lesa.models.registry import fitting_options

    bare = tmp_path / "w.pt"
    torch.save(create_model("lesa_resnet_tiny", pos_embed="rel2d", heads=4).state_dict(), bare)
    assert fitting_options("lesa_resnet_tiny", torch.load(bare, weights_only=True)) == {"pos_embed": "rel2d",
                                                                                       "heads": 4}
    code, err = cli("eval", "--checkpoint", bare, "--model", "lesa_resnet_tiny", "--data", "digits", "--quiet")
    assert code == 0, err
