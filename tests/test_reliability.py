"""Bad input and faults: each gives one line naming what was wrong and the fix, exit code 2, no traceback,
and loses nothing (docs/reliability.md lists every case with its test)."""
import errno
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesa import LESA2d, create_model, load_weights
from lesa.cli import main
from lesa.data.digit_scenes import ensure_digit_scenes
from lesa.data.images import read_image as _load_rgb
from lesa.errors import CheckpointError, ConfigError, LesaError
from lesa.utils import atomic_write

QUICK = ["--batch-size", "16", "--max-steps-per-epoch", "2", "--quiet"]


def cli(capsys, *args) -> tuple[int, str]:
    """Run ``lesa ARGS``; return the exit code and stderr, checked to be at most one line, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) <= 1, err
    return code, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished one-epoch classification run of resnet_tiny on the digits."""
    out = tmp_path_factory.mktemp("cls") / "run"
    assert main(["train", "--model", "resnet_tiny", "--epochs", "1", *QUICK, "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return ensure_digit_scenes(tmp_path_factory.mktemp("scenes"), counts={"train": 2, "val": 1})


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
def test_every_checkpoint_reader_reports_a_bad_file_in_one_line(tmp_path, capsys, run_dir, scenes, kind, reader):
    run = tmp_path / "run"
    run.mkdir()
    bad = bad_file(kind, run / "last.pt", run_dir / "last.pt")
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
            "det train --resume": ["det", "train", "--data", scenes, "--output", run, "--resume", "--quiet"],
            "--pretrained-backbone": ["det", "train", "--data", scenes, "--backbone", "resnet_tiny", "--output",
                                      tmp_path / "det", "--pretrained-backbone", bad, "--quiet"],
        }[reader]
        code, message = cli(capsys, *args)
        assert code == 2
    assert str(bad) in message
    assert "weights_only=False" not in message
    expected = {"empty": "is empty", "truncated": "truncated or corrupt", "random": "not a torch checkpoint",
                "code": "pickled Python objects"}[kind]
    assert expected in message, message
    assert not (tmp_path / "run" / "pwned").exists()  # the pickled command never ran
    assert bad.exists() and not (tmp_path / "out.pt").exists()


def test_integer_weights_are_refused_and_half_precision_converts(tmp_path, capsys):
    from safetensors.torch import save_file

    model = create_model("resnet_tiny")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({k: (v * 100).to(torch.int64) if v.is_floating_point() else v for k, v in sd.items()},
              str(tmp_path / "int.safetensors"))
    code, err = cli(capsys, "eval", "--checkpoint", tmp_path / "int.safetensors", "--model", "resnet_tiny")
    assert code == 2 and "dtype" in err and "conv1.weight: checkpoint torch.int64 vs model torch.float32" in err
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(tmp_path / "half.safetensors"))
    loaded = load_weights(create_model("resnet_tiny"), tmp_path / "half.safetensors")
    torch.testing.assert_close(loaded.conv1.weight, sd["conv1.weight"].half().float())


def fake_detection_run(path: Path) -> Path:
    path.mkdir(parents=True)
    torch.save({"kind": "detection", "model": {}, "epoch": 1, "config": {"backbone": "lesa_resnet_tiny"}},
               path / "best.pt")
    return path


def test_a_run_of_the_other_kind_is_named(tmp_path, capsys, run_dir, scenes):
    for args in (["det", "eval", "--checkpoint", run_dir],
                 ["det", "predict", scenes / "val" / "00000.png", "--checkpoint", run_dir, "--output", tmp_path]):
        code, err = cli(capsys, *args)
        assert code == 2 and "is a classification run" in err and "lesa eval" in err
    det = fake_detection_run(tmp_path / "det")
    for args in (["eval", "--checkpoint", det], ["analyze", det]):
        code, err = cli(capsys, *args)
        assert code == 2 and "is a detection run" in err and "lesa det eval" in err
    code, err = cli(capsys, "det", "train", "--data", scenes, "--output", tmp_path / "d2", "--pretrained-backbone",
                    det / "best.pt", "--quiet")
    assert code == 2 and "is a detection run: --pretrained-backbone takes a classification checkpoint" in err


def test_a_directory_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    from lesa.ownership import claim, register

    out = tmp_path / "run"
    claim(out, "run")  # the folder of a run that is still going
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()} now\n")
        register(out / ".lock")  # as lesa's lock() does
        code, err = cli(capsys, "train", "--model", "resnet_tiny", "--epochs", "1", *QUICK, "--output", out)
        assert code == 2 and f"in use by a live run: process {sleeper.pid}" in err and ".lock" in err
        assert "delete" not in err and "remove" not in err  # no advice that would harm the live run
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone: its lock is stale, taken over and released at the end
    code, _ = cli(capsys, "train", "--model", "resnet_tiny", "--epochs", "1", *QUICK, "--output", out)
    assert code == 0 and (out / "last.pt").is_file() and not (out / ".lock").exists()
    # a .lock lesa did not write (in a folder lesa made) is never removed
    other = tmp_path / "other"
    claim(other, "run")
    (other / ".lock").write_text("my notes")
    code, err = cli(capsys, "train", "--model", "resnet_tiny", "--epochs", "1", *QUICK, "--output", other)
    assert code == 2 and "lesa did not write it" in err and (other / ".lock").read_text() == "my notes"


def test_resume_needs_a_run_of_the_same_kind(tmp_path, capsys, run_dir, scenes):
    code, err = cli(capsys, "train", "--model", "resnet_tiny", *QUICK, "--output", tmp_path / "none", "--resume")
    assert code == 2 and "there is no" in err and "drop --resume" in err
    code, err = cli(capsys, "det", "train", "--data", scenes, "--output", run_dir, "--resume", "--quiet")
    assert code == 2 and "holds a classification run, not a detection run" in err


def test_run_output_without_last_pt_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"precious")
    (out / "metrics.csv").write_text("epoch\n1\n")
    code, err = cli(capsys, "train", "--model", "resnet_tiny", "--epochs", "1", *QUICK, "--output", out)
    assert code == 2 and "holds files lesa did not write (best.pt, metrics.csv)" in err
    assert (out / "best.pt").read_bytes() == b"precious" and not (out / "last.pt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "metrics.csv"]  # no marker, no lock written


def test_resume_keeps_config_until_its_checkpoint_and_removes_interrupted_writes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet_tiny", *QUICK, "--output", out]
    assert cli(capsys, *args, "--epochs", "1")[0] == 0
    config = (out / "config.yaml").read_text()
    (out / ".lesa-tmp-last.pt.abc123xy.tmp").write_bytes(b"\0" * 1000)  # what a kill during a write leaves
    (out / ".last.pt.abc123.tmp").write_bytes(b"user's")  # a user's file of the same shape: not lesa's prefix
    # a resume that fails before training leaves config.yaml as the run's
    code, err = cli(capsys, *args, "--epochs", "2", "--resume", "--img-size", "24")
    assert code == 2 and "img_size=None, this command 24" in err
    assert (out / "config.yaml").read_text() == config
    assert cli(capsys, *args, "--epochs", "2", "--resume")[0] == 0
    assert "epochs: 2" in (out / "config.yaml").read_text()
    assert not list(out.glob(".lesa-tmp-*")) and not (out / ".lock").exists()
    assert (out / ".last.pt.abc123.tmp").read_bytes() == b"user's"


@pytest.mark.parametrize("args,message", [
    (["--lr", "0"], "--lr: got 0.0; use a value > 0"),
    (["--label-smoothing", "2"], "--label-smoothing: got 2.0; use a value < 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs: got -1.0; use a value >= 0"),
    (["--img-size", "0"], "--img-size: got 0; use a value >= 1"),
    (["--epochs", "0"], "--epochs: got 0; use a value >= 1"),
    (["--batch-size", "0"], "--batch-size: got 0; use a value >= 1"),
    (["--heads", "4", "--model", "resnet_tiny"], "resnet_tiny does not use the layer option(s) heads"),
    (["--config", "CONFIG"], "epochs in CONFIG: got '3'; give a whole number"),
])
def test_options_are_validated_before_anything_is_built(tmp_path, capsys, monkeypatch, args, message):
    import lesa.classification.task as classification

    (tmp_path / "c.yaml").write_text('epochs: "3"\n')
    args = [str(tmp_path / "c.yaml") if a == "CONFIG" else a for a in args]
    built = []
    monkeypatch.setattr(classification, "classification_data", lambda *a, **k: built.append(a))
    code, err = cli(capsys, "train", *args, "--output", tmp_path / "run", "--quiet")
    assert code == 2 and message.replace("CONFIG", str(tmp_path / "c.yaml")) in err
    assert not built and not (tmp_path / "run").exists()


def test_model_options_are_checked():
    with pytest.raises(ConfigError, match="num_classes must be >= 0"):
        create_model("resnet_tiny", num_classes=-1)
    assert isinstance(create_model("resnet_tiny", num_classes=0).fc, torch.nn.Identity)  # 0: no head
    with pytest.raises(ConfigError, match="aa_resnet_tiny does not use the layer option"):
        create_model("aa_resnet_tiny", unary="deform")
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("lesa_resnet51")


def test_det_options_are_validated(tmp_path, capsys):
    code, err = cli(capsys, "det", "train", "--lr", "-1", "--output", tmp_path / "r", "--quiet")
    assert code == 2 and "--lr: got -1.0; use a value > 0" in err
    code, err = cli(capsys, "det", "train", "--dcn-stages", "5", "--output", tmp_path / "r", "--quiet")
    assert code == 2 and "--dcn-stages[0]: got 5; use a value <= 4" in err


def test_debug_shows_tracebacks_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError):
        main(["--debug", "train", "--lr", "0", "--output", str(tmp_path / "r")])
    monkeypatch.setenv("LESA_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "--lr", "0", "--output", str(tmp_path / "r")])
    monkeypatch.delenv("LESA_DEBUG")
    # a programming error (not a LesaError) is not swallowed into one line
    import lesa.cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setitem(lesa.cli.COMMANDS, "models", (*lesa.cli.COMMANDS["models"][:3], broken))
    with pytest.raises(TypeError, match="a bug"):
        main(["models"])


def test_one_class_folders_are_refused(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "cat" / "0.png")
    code, err = cli(capsys, "train", "--data", tmp_path / "data", "--output", tmp_path / "run", "--quiet")
    assert code == 2 and "one class folder ('cat'): a classifier needs at least two" in err


def test_16_bit_images_keep_their_contrast(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    rgb = np.asarray(_load_rgb(str(tmp_path / "ramp.png")))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb)) == 256  # not clipped to black and white
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257.0), atol=1)


@pytest.mark.parametrize("fault,message", [
    ("missing_image", "image file(s) listed there are missing"),
    ("mask_missing", "while the others have masks"),
    ("odd_polygon", "an odd count"),
    ("unknown_category", "has category_id 99, which is not among the categories"),
])
def test_coco_annotations_are_validated_before_training(tmp_path, capsys, fault, message):
    root = ensure_digit_scenes(tmp_path / "scenes", counts={"train": 2, "val": 1})
    annotations = json.loads((root / "train.json").read_text())
    ann = annotations["annotations"][0]
    if fault == "missing_image":
        (root / "train" / annotations["images"][0]["file_name"]).unlink()
    elif fault == "mask_missing":
        ann["segmentation"] = []
    elif fault == "odd_polygon":
        ann["segmentation"] = [[1.0, 1.0, 5.0, 1.0, 5.0]]
    else:
        ann["category_id"] = 99
    (root / "train.json").write_text(json.dumps(annotations))
    code, err = cli(capsys, "det", "train", "--data", root, "--output", tmp_path / "run", "--quiet")
    assert code == 2 and message in err and str(root / "train.json") in err
    if fault != "missing_image":
        assert f"annotation {ann['id']}" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import lesa.engine.checkpoint as checkpoint

    out = tmp_path / "run"
    args = ["train", "--model", "resnet_tiny", *QUICK, "--output", out]
    assert cli(capsys, *args, "--epochs", "1")[0] == 0
    good = (out / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, path):
        real_save(obj, path)  # half a file, then the disk is full
        Path(path).write_bytes(Path(path).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code, err = cli(capsys, *args, "--epochs", "2", "--resume")
    assert code == 2 and "no space left on device while writing" in err and "keeps its previous contents" in err
    assert (out / "last.pt").read_bytes() == good and not list(out.glob(".*.tmp"))


def test_atomic_write_names_a_full_disk_that_torch_reports_otherwise(tmp_path, monkeypatch):
    import shutil

    import lesa.utils

    monkeypatch.setattr(lesa.utils.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))

    def torch_like(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")

    with pytest.raises(LesaError, match="no space left on device"):
        atomic_write(tmp_path / "x.pt", torch_like)


def test_the_reference_path_refuses_what_cannot_be_allocated(monkeypatch):
    import lesa.layers.guards as guards

    layer = LESA2d(32, 32, heads=4, pos_embed="rel2d", feature_size=16, impl="reference")
    x = torch.randn(2, 32, 16, 16)
    monkeypatch.setattr(guards, "free_memory", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ConfigError, match=r"impl='reference' would materialise 2x8x256x256 .*use impl='fused'"):
        layer(x)
    layer.binary.impl = "fused"
    assert layer(x).shape == x.shape  # needs no (HW)^2 tensor


def test_models_pattern_without_a_match(capsys):
    assert main(["models", "lesa_vit*"]) == 1
    assert "no model matches 'lesa_vit*'" in capsys.readouterr().err
    assert main(["models", "lesa_*"]) == 0
