"""The run directory (lesa.engine.run_dir) and how checkpoints are written (lesa.engine.checkpoint,
lesa.utils.atomic_write): one live run per folder (its lock; a stale lock taken over, a user's .lock never
removed), ``--resume`` only of a run of the same kind, a folder of files lesa did not write refused,
config.yaml kept until the resumed checkpoint is read, interrupted writes cleaned, and a failed or full-disk
write keeps the previous file."""
import errno
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli

from lesa.errors import LesaError
from lesa.ownership import MARKER, claim, register
from lesa.utils import atomic_write

TRAIN = ["train", "--model", "resnet_tiny", "--batch-size", "16", "--max-steps-per-epoch", "2", "--quiet"]


def test_a_directory_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    claim(out, "run")  # the folder of a run that is still going
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()} now\n")
        register(out / ".lock")  # as lesa's lock() does
        code, err = cli(*TRAIN, "--epochs", "1", "--output", out)
        assert code == 2 and f"in use by a live run: process {sleeper.pid}" in err and ".lock" in err
        assert "delete" not in err and "remove" not in err  # no advice that would harm the live run
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone: its lock is stale, taken over and released at the end
    code, _ = cli(*TRAIN, "--epochs", "1", "--output", out)
    assert code == 0 and (out / "last.pt").is_file() and not (out / ".lock").exists()
    # a .lock lesa did not write (in a folder lesa made) is never removed
    other = tmp_path / "other"
    claim(other, "run")
    (other / ".lock").write_text("my notes")
    code, err = cli(*TRAIN, "--epochs", "1", "--output", other)
    assert code == 2 and "lesa did not write it" in err and (other / ".lock").read_text() == "my notes"


def test_resume_needs_a_run_of_the_same_kind(tmp_path, digits_run, digit_scenes):
    code, err = cli(*TRAIN, "--output", tmp_path / "none", "--resume")
    assert code == 2 and "there is no" in err and "drop --resume" in err
    code, err = cli("det", "train", "--data", digit_scenes, "--output", digits_run, "--resume", "--quiet")
    assert code == 2 and "holds a classification run, not a detection run" in err


def test_run_output_without_last_pt_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"precious")
    (out / "metrics.csv").write_text("epoch\n1\n")
    code, err = cli(*TRAIN, "--epochs", "1", "--output", out)
    assert code == 2 and "holds files lesa did not write (best.pt, metrics.csv)" in err
    assert (out / "best.pt").read_bytes() == b"precious" and not (out / "last.pt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "metrics.csv"]  # no marker, no lock written


def test_resume_keeps_config_until_its_checkpoint_and_removes_interrupted_writes(tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN, "--output", out]
    assert cli(*args, "--epochs", "1", "--img-size", "24", "--label-smoothing", "0.1")[0] == 0
    config = (out / "config.yaml").read_text()
    (out / ".lesa-tmp-last.pt.abc123xy.tmp").write_bytes(b"\0" * 1000)  # what a kill during a write leaves
    (out / ".last.pt.abc123.tmp").write_bytes(b"user's")  # a user's file of the same shape: not lesa's prefix
    # a resume that fails before training leaves config.yaml as the run's; every option that differs is named
    code, err = cli(*args, "--epochs", "2", "--resume", "--img-size", "32", "--model", "sa_resnet_tiny")
    assert code == 2 and "has model='resnet_tiny', img_size=24, this command model='sa_resnet_tiny', img_size=32" in err
    assert "(--model resnet_tiny, --img-size 24; a resumed run keeps its own where neither" in err
    assert (out / "config.yaml").read_text() == config
    # what the resuming command does not give is the run's own, not a default
    assert cli("train", "--output", out, "--epochs", "2", "--resume", "--quiet")[0] == 0
    resumed = yaml.safe_load((out / "config.yaml").read_text())
    assert (resumed["epochs"], resumed["img_size"], resumed["label_smoothing"], resumed["model"]) == (
        2, 24, 0.1, "resnet_tiny")
    assert not list(out.glob(".lesa-tmp-*")) and not (out / ".lock").exists()
    assert (out / ".last.pt.abc123.tmp").read_bytes() == b"user's"


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import lesa.engine.checkpoint as checkpoint

    out = tmp_path / "run"
    args = [*TRAIN, "--output", out]
    assert cli(*args, "--epochs", "1")[0] == 0
    good = (out / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, path):
        real_save(obj, path)  # half a file, then the disk is full
        Path(path).write_bytes(Path(path).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code, err = cli(*args, "--epochs", "2", "--resume")
    assert code == 2 and "no space left on device while writing" in err and "keeps its previous contents" in err
    assert (out / "last.pt").read_bytes() == good and not list(out.glob(".*.tmp"))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    claim(tmp_path, "run")  # lesa's folder: it may replace what it wrote there
    target = tmp_path / "f.txt"
    atomic_write(target, lambda tmp: Path(tmp).write_text("one"))
    assert target.read_text() == "one" and (target.stat().st_mode & 0o044)  # readable like any new file

    def broken(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "one" and sorted(tmp_path.iterdir()) == [tmp_path / MARKER, target]


def test_atomic_write_names_a_full_disk_that_torch_reports_otherwise(tmp_path, monkeypatch):
    import shutil

    import lesa.utils

    monkeypatch.setattr(lesa.utils.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))

    def torch_like(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")

    with pytest.raises(LesaError, match="no space left on device"):
        atomic_write(tmp_path / "x.pt", torch_like)


def test_resume_of_the_default_folder_and_of_a_fine_tuned_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = ["--max-steps-per-epoch", "1", "--batch-size", "16", "--quiet"]
    assert cli("train", "--model", "sa_resnet_tiny", "--heads", "4", "--epochs", "1", *quick)[0] == 0
    # no --output: the default folder's run, with its own options
    assert cli("train", "--model", "sa_resnet_tiny", "--resume", "--epochs", "2")[0] == 0
    run = yaml.safe_load((tmp_path / "runs" / "sa_resnet_tiny-digits" / "config.yaml").read_text())
    assert (run["epochs"], run["model_kwargs"], run["batch_size"]) == (2, {"heads": 4}, 16)
    # a run started with --init resumes from its own checkpoint, not the --init one again
    out = tmp_path / "ft"
    assert cli("train", "--init", tmp_path / "runs" / "sa_resnet_tiny-digits", "--epochs", "1", *quick,
               "--output", out)[0] == 0
    assert cli("train", "--resume", "--output", out, "--epochs", "2")[0] == 0
