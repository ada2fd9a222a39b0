"""`lesa train` / `lesa eval` end to end on the embedded digits and on image folders: the run directory's files,
resume after SIGKILL or an interrupted evaluation, DDP, a diverging loss, undecodable images, bad data folders,
options checked before anything is built, and the configuration's presets and schedule."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import cli, image_folder
from PIL import Image

from lesa.classification import build_config
from lesa.classification.config import PRESETS
from lesa.cli import main
from lesa.engine import warmup_cosine as lr_factor
from lesa.engine.config import preset_values
from lesa.engine.records import read_metrics_csv

QUICK = ["--model", "lesa_resnet_tiny", "--batch-size", "16", "--max-steps-per-epoch", "3", "--quiet"]


def lesa_cmd(*args):
    return [sys.executable, "-m", "lesa", *args]


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "2", "--output", str(out)]) == 0
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    rows = read_metrics_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_time_s"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "lesa_resnet_tiny" and summary["epochs"] == 2 and summary["world_size"] == 1
    assert summary["params"] > 5e5 and 0 <= summary["val_top1"] <= 100 and summary["val_top5"] >= summary["val_top1"]
    assert summary["wall_time_s"] > 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"] == "lesa_resnet_tiny"

    assert main(["eval", "--checkpoint", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "(360 images)" in printed

    # the run directory is not overwritten by accident
    assert main(["train", *QUICK, "--epochs", "2", "--output", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    args = [*QUICK, "--model", "sa_resnet_tiny", "--epochs", "3", "--seed", "3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run beside the killed one: one thread each, the two cores busy
    uninterrupted = subprocess.Popen(lesa_cmd("train", *args, "--output", str(straight)), env=env)
    proc = subprocess.Popen(lesa_cmd("train", *args, "--output", str(killed)), env=env)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert done < 3, "the run finished before it could be killed"
    assert uninterrupted.wait() == 0
    subprocess.run(lesa_cmd("train", *args, "--output", str(killed), "--resume"), check=True, env=env)

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    rows_a, rows_b = read_metrics_csv(straight / "metrics.csv"), read_metrics_csv(killed / "metrics.csv")
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b):
        for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key


def test_an_epoch_is_saved_before_its_evaluation_and_evaluated_on_resume(tmp_path, monkeypatch):
    """last.pt holds a trained epoch before evaluation starts; a run stopped during the evaluation resumes by
    evaluating that epoch, so its row and best.pt are as if nothing happened."""
    from lesa.classification import ClassificationTask

    out = tmp_path / "run"

    def interrupted(self, net, runtime):
        raise KeyboardInterrupt  # a Ctrl-C (or a kill) while the validation set is read

    monkeypatch.setattr(ClassificationTask, "evaluate", interrupted)
    assert main(["train", *QUICK, "--epochs", "2", "--output", str(out)]) == 130  # lesa's exit code for Ctrl-C
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["history"] == [] and saved["unevaluated"]["epoch"] == 1
    assert not (out / "best.pt").exists()
    monkeypatch.undo()
    assert main(["train", *QUICK, "--epochs", "2", "--output", str(out), "--resume"]) == 0
    rows = read_metrics_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["val_top1"] <= 100 for r in rows)
    assert "unevaluated" not in torch.load(out / "last.pt", weights_only=True)


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lesa",
           "train", *QUICK, "--epochs", "1", "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    cfg = torch.load(out / "last.pt", weights_only=True)
    assert len(cfg["rng"]) == 2  # each process's RNG state, for resume


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--output", str(out)]) == 0
    before = (out / "last.pt").read_bytes()
    assert main(["train", *QUICK, "--epochs", "2", "--output", str(out), "--resume", "--lr", "1e12"]) == 1
    err = capsys.readouterr().err
    assert "the loss became" in err and "last.pt (after epoch 1)" in err
    assert (out / "last.pt").read_bytes() == before


def test_image_folder_training_counts_undecodable_images(tmp_path, capsys):
    image_folder(tmp_path / "data", n=6, bad=1)
    out = tmp_path / "run"
    common = ["train", "--model", "resnet_tiny", "--data", str(tmp_path / "data"), "--img-size", "32",
              "--epochs", "1", "--batch-size", "4", "--quiet"]
    with pytest.warns(UserWarning, match="skipping undecodable image"):
        assert main([*common, "--output", str(out), "--max-bad-fraction", "0.1"]) == 0
    assert json.loads((out / "summary.json").read_text())["skipped_images"] == 1
    # beyond the allowed fraction of the training set the run stops, from the first images on (3 of 15)
    image_folder(tmp_path / "bad", n=6, bad=3)
    with pytest.warns(UserWarning):
        assert main([*common, "--data", str(tmp_path / "bad"), "--output", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "could not be decoded" in err and "--max-bad-fraction" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("no_val", "val' is missing"),
    ("empty", "no class folders"),
    ("mismatch", "class folders differ between train and val: only in train: \\['dog'\\]"),
])
def test_bad_data_folders(tmp_path, capsys, case, message):
    root = tmp_path / "data"
    if case == "no_val":
        (root / "train" / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "0.png")
    elif case == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif case == "mismatch":
        image_folder(root, n=6, val_classes=("cat",))
    assert main(["train", "--data", str(root), "--output", str(tmp_path / "run"), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_one_class_folders_are_refused(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "cat" / "0.png")
    code, err = cli("train", "--data", tmp_path / "data", "--output", tmp_path / "run", "--quiet")
    assert code == 2 and "one class folder ('cat'): a classifier needs at least two" in err


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
def test_options_are_validated_before_anything_is_built(tmp_path, monkeypatch, args, message):
    import lesa.classification.task as classification

    (tmp_path / "c.yaml").write_text('epochs: "3"\n')
    args = [str(tmp_path / "c.yaml") if a == "CONFIG" else a for a in args]
    built = []
    monkeypatch.setattr(classification, "classification_data", lambda *a, **k: built.append(a))
    code, err = cli("train", *args, "--output", tmp_path / "run", "--quiet")
    assert code == 2 and message.replace("CONFIG", str(tmp_path / "c.yaml")) in err
    assert not built and not (tmp_path / "run").exists()


def test_unknown_model_lists_names(tmp_path, capsys):
    assert main(["train", "--model", "lesa_resnet_teeny", "--output", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'lesa_resnet_teeny'" in err and "lesa_resnet_tiny" in err


def test_config_precedence_and_presets(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nlr: 0.2\nmodel: sa_resnet_tiny\n")
    cfg = build_config(str(cfg_file), None, lr=0.3)
    assert (cfg.epochs, cfg.lr, cfg.model) == (7, 0.3, "sa_resnet_tiny")
    imagenet = build_config(None, "imagenet", data="/data/imagenet")
    assert (imagenet.model, imagenet.epochs, imagenet.lr, imagenet.lr_base_batch) == ("lesa_resnet50", 90, 0.05, 128)
    assert imagenet.nesterov and imagenet.warmup_epochs == 5 and imagenet.weight_decay == 8e-5
    with pytest.raises(ValueError, match="unknown option.*epoch.*did you mean epochs"):
        build_config(None, None, epoch=3)
    with pytest.raises(ValueError, match="pass --data PATH"):
        build_config(None, "imagenet")


def test_warmup_then_cosine_per_step():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_defaults_are_the_digits_preset():
    defaults = build_config().to_dict()
    for key, value in preset_values("digits", PRESETS).items():
        assert defaults[key] == value or (key == "img_size" and defaults[key] is None), key
