"""lesa writes only what it owns (lesa.ownership): every writing command leaves every file it did not write
byte-identical, whatever the output folder and the working folder hold; runs move with their data; and the
advice of each refusal works when followed (docs/reliability.md, "Ownership, runs that move, advice that works").
"""
import contextlib
import errno
import io
import os
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli, image_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lesa.cli import main
from lesa.data.digit_scenes import ensure_digit_scenes
from lesa.ownership import MARKER, claim

TRAIN = ["--model", "resnet_tiny", "--epochs", "1", "--batch-size", "16", "--max-steps-per-epoch", "1", "--quiet"]
DET = ["--backbone", "resnet_tiny", "--epochs", "1", "--batch-size", "2", "--min-size", "64", "--max-size", "96",
       "--max-steps-per-epoch", "1", "--quiet"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A classification run, a detection run, a weights file and a photo, made once."""
    root = tmp_path_factory.mktemp("built")
    assert cli("train", *TRAIN, "--output", root / "cls")[0] == 0
    scenes = ensure_digit_scenes(root / "scenes", counts={"train": 2, "val": 1})
    assert cli("det", "train", "--data", scenes, *DET, "--output", root / "det")[0] == 0
    weights = root / "weights.pt"
    torch.save(torch.load(root / "cls" / "best.pt", weights_only=True)["model"], weights)
    (root / "shots").mkdir()
    shutil.copy(next((scenes / "val").glob("*.png")), root / "shots" / "photo.png")
    return dict(cls=root / "cls", det=root / "det", weights=weights, photo=root / "shots" / "photo.png",
                scenes=scenes)


# Every command that writes, run from a working folder in which `out` is its output (created or not).
COMMANDS = {
    "train": lambda b: ["train", *TRAIN, "--output", "out"],
    "train default output": lambda b: ["train", *TRAIN],  # runs/resnet_tiny-digits in the working folder
    "det train": lambda b: ["det", "train", "--data", b["scenes"], *DET, "--output", "out"],
    "eval": lambda b: ["eval", "--checkpoint", b["cls"], "--quiet"],
    "det eval": lambda b: ["det", "eval", "--checkpoint", b["det"], "--output", "out"],
    "analyze": lambda b: ["analyze", b["cls"], "--output", "out", "--max-batches", "1"],
    "compare": lambda b: ["compare", "--quick", "--ops", "conv", "--seeds", "1", "--epochs", "1",
                          "--max-steps-per-epoch", "1", "--quiet", "--output", "out"],
    "det predict": lambda b: ["det", "predict", b["photo"], "--checkpoint", b["det"], "--output", "out"],
    "export": lambda b: ["export", b["cls"], "out/model.pt2", "--no-check"],
    "convert": lambda b: ["convert", b["weights"], "out.pt", "--model", "resnet_tiny"],
}
# names the commands write, and lesa's own kinds of name, so that collisions are common
WRITTEN = ["config.yaml", "last.pt", "best.pt", "metrics.csv", "summary.json", "curves.png", "tb", "shares.json",
           "shares.png", "gate_maps.png", "attention_map.png", "coco_eval.json", "compare.json", "compare.md",
           "photo.png", "model.pt2", "out.pt", ".lock", MARKER, ".lesa-tmp-last.pt.x.tmp", ".last.pt.ab12.tmp",
           ".paper-draft.tmp", "conv", "analysis_conv", "runs", "runs/resnet_tiny-digits/config.yaml",
           "runs/resnet_tiny-digits/last.pt", "conv/seed0/last.pt", "out"]
names = st.one_of(st.sampled_from(WRITTEN), st.text(string.ascii_letters + "._-", min_size=1, max_size=8)
                  .filter(lambda n: n not in (".", "..")))
layouts = st.lists(st.tuples(st.sampled_from(["out", "."]), names, st.binary(max_size=16)), max_size=6)


def lay_out(cwd: Path, layout) -> dict[Path, bytes]:
    """Write the user's files; return each file with its bytes (a name taken by a folder is skipped)."""
    files = {}
    for place, name, content in layout:
        path = cwd / place / name
        with contextlib.suppress(OSError):  # a file where a folder of another entry goes, or the reverse
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_bytes(content)
                files[path] = content
    return {p: c for p, c in files.items() if p.is_file()}


@pytest.mark.parametrize("command", list(COMMANDS))
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=layouts)
def test_no_command_changes_a_file_it_did_not_write(built, command, layout):
    cwd = Path(tempfile.mkdtemp())
    here = os.getcwd()
    try:
        files = lay_out(cwd, layout)
        os.chdir(cwd)
        code, err = cli(*COMMANDS[command](built))
        assert code == 0 or (code == 2 and err.startswith("lesa ") and ": error: " in err), err
        for path, content in files.items():
            assert path.is_file() and path.read_bytes() == content, (command, path, err)
    finally:
        os.chdir(here)
        shutil.rmtree(cwd, ignore_errors=True)


# -- a user's files in an output folder, and runs that move with their data ----------------------------------
def test_a_users_folder_is_refused_before_any_work_naming_its_files(tmp_path, built, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.yaml").write_text("# mine\nepochs: 9\n")
    (proj / ".paper-draft.tmp").write_text("draft")
    code, err = cli("train", *TRAIN, "--output", proj)
    assert code == 2 and "holds files lesa did not write (.paper-draft.tmp, config.yaml)" in err
    assert sorted(p.name for p in proj.iterdir()) == [".paper-draft.tmp", "config.yaml"]  # nothing added
    monkeypatch.chdir(proj)
    code, err = cli("train", "--config", "config.yaml", "--output", ".", "--quiet")
    assert code == 2 and "input" in err and (proj / "config.yaml").read_text() == "# mine\nepochs: 9\n"
    album = tmp_path / "album"
    album.mkdir()
    (album / "photo.png").write_bytes(b"my photo")
    code, err = cli("det", "predict", built["photo"], "--checkpoint", built["det"], "--output", album)
    assert code == 2 and "lesa did not write" in err and (album / "photo.png").read_bytes() == b"my photo"
    report = tmp_path / "report"
    report.mkdir()
    (report / "shares.json").write_text("{}")
    code, err = cli("analyze", built["cls"], "--output", report)
    assert code == 2 and (report / "shares.json").read_text() == "{}"
    # the advice works: a new folder, created by lesa
    assert cli("analyze", built["cls"], "--output", tmp_path / "report2", "--max-batches", "1")[0] == 0
    assert (tmp_path / "report2" / MARKER).is_file()


def test_lesa_refreshes_its_own_outputs_and_leaves_a_users_file_in_its_folder(tmp_path, built):
    out = tmp_path / "analysis"
    assert cli("analyze", built["cls"], "--output", out, "--max-batches", "1")[0] == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "shares.json").stat().st_mtime_ns
    assert cli("analyze", built["cls"], "--output", out, "--max-batches", "1")[0] == 0
    assert (out / "shares.json").stat().st_mtime_ns != before and (out / "notes.txt").read_text() == "mine"
    code, err = cli("det", "eval", "--checkpoint", built["det"], "--output", out)  # an analysis is no evaluation
    assert code == 2 and "lesa's analysis folder" in err and "choose a new folder" in err


def test_an_output_file_lesa_did_not_write_is_never_replaced(tmp_path, built):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"someone's weights")
    code, err = cli("convert", built["weights"], target, "--model", "resnet_tiny")
    assert code == 2 and "lesa replaces no file outside the folders it made" in err
    assert target.read_bytes() == b"someone's weights"
    # inside lesa's own run folder, its own export is replaced on a second export
    for _ in range(2):
        assert cli("export", built["cls"], built["cls"] / "model.pt2", "--no-check")[0] == 0


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_detection_run_moved_with_its_data_evaluates_and_resumes_from_anywhere(tmp_path, built, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(built["scenes"], proj / "coco")
    monkeypatch.chdir(proj)
    assert cli("det", "train", "--data", "coco", *DET, "--output", "run")[0] == 0
    other = tmp_path / "elsewhere"
    ensure_digit_scenes(other / "coco", counts={"train": 2, "val": 3})  # other data under the same name
    moved = tmp_path / "moved"
    proj.rename(moved)
    monkeypatch.chdir(other)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["det", "eval", "--checkpoint", "../moved/run"]) == 0
    assert str(moved / "coco") in out.getvalue() and str(other) not in out.getvalue()
    # resumed from here with the data's new absolute path: the same files, so it goes on
    assert cli("det", "train", "--data", moved / "coco", *DET[:2], "--epochs", "2", *DET[4:],
               "--output", "../moved/run", "--resume")[0] == 0
    # other data is refused with the difference
    code, err = cli("det", "train", "--data", "coco", *DET[:2], "--epochs", "3", *DET[4:],
                    "--output", "../moved/run", "--resume")
    assert code == 2 and "holds other data" in err


def test_a_classification_run_copied_with_its_data_resumes_and_evaluates(tmp_path):
    proj = tmp_path / "proj"
    data = image_folder(proj / "data", classes=("a", "b"), n=4, size=(12, 12))
    args = ["--model", "resnet_tiny", "--img-size", "16", "--batch-size", "4", "--max-steps-per-epoch", "1",
            "--quiet"]
    assert cli("train", *args, "--epochs", "1", "--data", data, "--output", proj / "runs" / "r")[0] == 0
    copy = copy_tree(proj, tmp_path / "machine2" / "proj")
    shutil.rmtree(proj)  # the old path is gone, as on another machine
    run = copy / "runs" / "r"
    assert cli("eval", "--checkpoint", run, "--quiet")[0] == 0  # found at ../../data from the run folder
    code, err = cli("train", *args, "--epochs", "2", "--output", run, "--resume")
    assert code == 2 and f"(--data {copy / 'data'};" in err  # the advice names the data where it is now
    assert cli("train", *args, "--epochs", "2", "--data", copy / "data", "--output", run, "--resume")[0] == 0


# -- every refusal's advice, followed ----------------------------------------------------------------------
def test_a_diverged_first_epoch_starts_again_in_place(tmp_path):
    out = tmp_path / "run"
    diverging = [*TRAIN[:-2], "3", "--quiet", "--lr", "1e12"]  # three steps: the third loss is not finite
    code, err = cli("train", *diverging, "--output", out)
    assert code == 1 and "No epoch finished" in err and "run the command again with a lower --lr" in err
    assert cli("train", *TRAIN, "--output", out)[0] == 0  # the advice: the same folder, a lower lr
    shutil.rmtree(out)
    assert cli("train", *diverging, "--output", out)[0] == 1
    assert cli("train", *TRAIN, "--output", out, "--resume")[0] == 0  # --resume of no epoch starts again too


def test_a_full_disk_in_the_first_epoch_then_the_advice(tmp_path, monkeypatch):
    from lesa.utils import atomic_write

    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr("lesa.engine.loop.save_checkpoint", lambda path, state: atomic_write(path, no_space))
        code, err = cli("train", *TRAIN, "--output", out)
    assert code == 2 and "free space and run the command again (a training run: with --resume)" in err
    assert not (out / "last.pt").exists()
    assert cli("train", *TRAIN, "--output", out, "--resume")[0] == 0  # the advice, followed


def test_an_interrupted_first_epoch_starts_again_with_the_same_command(tmp_path, monkeypatch):
    import lesa.engine.loop as loop

    out = tmp_path / "run"

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop.Engine, "train_epoch", interrupted)
        assert cli("train", *TRAIN, "--output", out)[0] == 130
    assert (out / MARKER).is_file() and not (out / "last.pt").exists()
    assert cli("train", *TRAIN, "--output", out)[0] == 0


def test_a_repeated_config_is_refused_and_extends_works(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("epochs: 1\nmodel: resnet_tiny\n")
    (tmp_path / "b.yaml").write_text("batch_size: 16\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["train", "--config", "a.yaml", "--config", "b.yaml"])
    assert info.value.code == 2 and "write 'extends: a.yaml' in b.yaml" in err.getvalue()
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nbatch_size: 16\n")
    assert cli("train", "--config", "b.yaml", "--max-steps-per-epoch", "1", "--quiet", "--output", "r")[0] == 0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["model"]) == (1, 16, "resnet_tiny")
    # the run's own config.yaml starts a new run with the same options (it carries no resume / output)
    assert "resume" not in saved and "output" not in saved
    assert cli("train", "--config", "r/config.yaml", "--output", "r2")[0] == 0


# -- outputs that cannot be made, resumes that ask for fewer epochs, lesa's folders of another kind ----------
def test_smaller_cases_are_one_line_or_right(tmp_path, built, monkeypatch):
    code, err = cli("train", *TRAIN, "--output", "/proc/lesa-run")
    assert code == 2 and "cannot be created" in err
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LESA_DATA_DIR", str(tmp_path / "afile"))
    code, err = cli("train", *TRAIN, "--data", "fashion-mnist", "--output", tmp_path / "f")
    assert code == 2 and "LESA_DATA_DIR" in err and "is a file" in err
    monkeypatch.delenv("LESA_DATA_DIR")
    run = copy_tree(built["cls"], tmp_path / "cls")
    code, err = cli("train", *TRAIN[:2], "--epochs", "1", *TRAIN[4:], "--output", run, "--resume")
    assert code == 0  # as many epochs as trained: it finishes
    code, err = cli("train", *TRAIN[:2], "--epochs", "2", *TRAIN[4:], "--output", run, "--resume")
    assert code == 0
    code, err = cli("train", *TRAIN[:2], "--epochs", "1", *TRAIN[4:], "--output", run, "--resume")
    assert code == 2 and "has trained 2 epochs" in err and "pass --epochs 2 or more" in err
    code, err = cli("convert", built["weights"], tmp_path / "c.pt")
    assert code == 2 and "not an official LESA checkpoint" in err and not (tmp_path / "c.pt").exists()


def test_claim_refuses_lesa_folders_of_another_kind_and_adopts_earlier_runs(tmp_path):
    claim(tmp_path / "a", "analysis")
    with pytest.raises(PermissionError, match="analysis folder"):
        claim(tmp_path / "a", "run")
    earlier = tmp_path / "old"
    earlier.mkdir()
    for name in ("last.pt", "config.yaml", "metrics.csv"):
        (earlier / name).write_bytes(b"x")
    assert claim(earlier, "run").entries == {"last.pt", "config.yaml", "metrics.csv"}


# -- folders and files that look like lesa's, outputs inside the data, data that moved or changed ------------
def test_a_folder_that_looks_like_an_earlier_run_is_not_written_by_other_commands(tmp_path, built):
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("last.pt", "best.pt", "coco_eval.json"):
        (proj / name).write_text("mine")
    code, err = cli("convert", built["weights"], proj / "best.pt", "--model", "resnet_tiny")
    assert code == 2 and "exists: lesa replaces no file outside the folders it made" in err
    code, err = cli("det", "eval", "--checkpoint", built["det"], "--output", proj)
    assert code == 2 and "holds files lesa did not write" in err
    assert all((proj / name).read_text() == "mine" for name in ("last.pt", "best.pt", "coco_eval.json"))
    assert not (proj / MARKER).exists()


def test_export_and_convert_never_write_a_runs_own_files(tmp_path, built):
    run = copy_tree(built["cls"], tmp_path / "run")
    before = (run / "last.pt").read_bytes()
    code, err = cli("convert", run / "best.pt", run / "last.pt")
    assert code == 2 and "is one of the files of lesa's run" in err and (run / "last.pt").read_bytes() == before
    assert cli("export", run, run / "model.pt2", "--no-check")[0] == 0  # another name in the run folder is fine


def test_a_users_marker_or_temp_file_makes_the_folder_theirs(tmp_path, built):
    for name, make in ((MARKER, lambda p: p.write_text("my dotfile")), (MARKER, lambda p: p.mkdir()),
                       (".lesa-tmp-mynotes.txt", lambda p: p.write_text("notes"))):
        folder = tmp_path / f"u{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        make(folder / name)
        code, err = cli("analyze", built["cls"], "--output", folder, "--max-batches", "1")
        assert code == 2 and "holds files lesa did not write" in err and sorted(os.listdir(folder)) == [name]


def test_outputs_inside_the_data_are_refused(tmp_path, built):
    data = image_folder(tmp_path / "data", classes=("a", "b"), n=4, size=(12, 12))
    code, err = cli("analyze", built["cls"], "--data", data, "--output", data / "val" / "a" / "an")
    assert code == 2 and "inside the data folder" in err
    code, err = cli("det", "train", "--data", built["scenes"], *DET, "--output", built["scenes"] / "val" / "r")
    assert code == 2 and "inside the data folder" in err


def test_analyze_takes_a_model_for_weights_only(tmp_path, built):
    code, err = cli("analyze", built["weights"], "--data", "digits", "--output", tmp_path / "a")
    assert code == 2 and "--model NAME" in err
    assert cli("analyze", built["weights"], "--model", "resnet_tiny", "--data", "digits", "--output", tmp_path / "a",
               "--max-batches", "1")[0] == 0


def test_the_repeated_config_advice_names_the_path_from_the_second_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "a.yaml").write_text("epochs: 1\n")
    (tmp_path / "cfg" / "b.yaml").write_text("model: resnet_tiny\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        main(["train", "--config", "cfg/a.yaml", "--config", "cfg/b.yaml"])
    assert "write 'extends: a.yaml' in cfg/b.yaml" in err.getvalue()


def test_a_run_resumed_with_moved_data_and_moved_again_alone_still_finds_it(tmp_path):
    args = ["--model", "resnet_tiny", "--img-size", "16", "--batch-size", "4", "--max-steps-per-epoch", "1",
            "--quiet"]
    old = image_folder(tmp_path / "old" / "data", classes=("a", "b"), n=4, size=(12, 12))
    assert cli("train", *args, "--epochs", "1", "--data", old, "--output", tmp_path / "old" / "run")[0] == 0
    new = tmp_path / "new"
    (tmp_path / "old").rename(new)
    assert cli("train", *args, "--epochs", "2", "--data", new / "data", "--output", new / "run", "--resume")[0] == 0
    (new / "run").rename(tmp_path / "run")  # the run alone: best.pt must name the data's new place too
    assert cli("eval", "--checkpoint", tmp_path / "run", "--quiet")[0] == 0
    assert cli("analyze", tmp_path / "run", "--output", tmp_path / "an", "--max-batches", "1")[0] == 0


def test_compare_refuses_runs_whose_data_changed_in_place(tmp_path):
    data = image_folder(tmp_path / "data", classes=("a", "b"), n=4, size=(12, 12))
    args = ["compare", "--ops", "conv", "--arch", "resnet_tiny", "--data", data, "--epochs", "1", "--batch-size", "4",
            "--max-steps-per-epoch", "1", "--quiet", "--output", tmp_path / "cmp"]
    assert cli(*args)[0] == 0
    Image.new("RGB", (12, 12)).save(data / "val" / "a" / "new.png")
    code, err = cli(*args)
    assert code == 2 and "its files changed since the run" in err
