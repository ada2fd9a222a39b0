"""Fashion-MNIST's reader on small IDX files the tests write (gzip and plain, and every way such a file
goes wrong), and on the real files where Debian's dataset-fashion-mnist package is installed."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lesa.classification.config import PRESETS
from lesa.classification.task import training_subset
from lesa.data import fashion_mnist
from lesa.data.fashion_mnist import (
    DEBIAN_DIR,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    FashionMNISTDataset,
    find_fashion_mnist,
    load_split,
)
from lesa.engine.config import preset_values
from lesa.errors import DataError, NotFoundError


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_set(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels"] = np.arange(n, dtype=np.uint8) % 10
        for kind, magic, dims in (("images", IMAGE_MAGIC, "idx3"), ("labels", LABEL_MAGIC, "idx1")):
            data = idx_bytes(arrays[f"{prefix}-{kind}"], magic)
            name = folder / f"{prefix}-{kind}-{dims}-ubyte"
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(data))
            else:
                name.write_bytes(data)
    return arrays


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """Look only where the test says (not in the Debian package, not in LESA_DATA_DIR)."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.delenv("LESA_DATA_DIR", raising=False)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_read_exactly_with_a_stratified_validation_split(tmp_path, no_system_copy, gz):
    arrays = write_set(tmp_path / "fm", gz=gz)
    images, labels = load_split("test", tmp_path / "fm")
    assert np.array_equal((images.numpy() * 255).round().astype(np.uint8), arrays["t10k-images"])
    assert np.array_equal(labels.numpy(), arrays["t10k-labels"])
    train, val = load_split("train", tmp_path / "fm"), load_split("val", tmp_path / "fm")
    assert len(train[1]) + len(val[1]) == 40 and len(val[1]) == 4
    # disjoint and together the whole training file
    seen = sorted(map(tuple, np.concatenate([train[0].numpy(), val[0].numpy()]).reshape(40, -1).tolist()))
    assert seen == sorted(map(tuple, (arrays["train-images"] / 255.0).astype(np.float32).reshape(40, -1).tolist()))
    assert np.array_equal(load_split("val", tmp_path / "fm")[1].numpy(), val[1].numpy())  # fixed draw


def test_the_search_order_and_torchvision_layout(tmp_path, no_system_copy, monkeypatch):
    write_set(tmp_path / "env" / "FashionMNIST" / "raw")
    monkeypatch.setenv("LESA_DATA_DIR", str(tmp_path / "env"))
    assert find_fashion_mnist() == tmp_path / "env" / "FashionMNIST" / "raw"
    write_set(tmp_path / "given")
    assert find_fashion_mnist(tmp_path / "given") == tmp_path / "given"  # --data-root first


def test_missing_files_name_the_three_ways_to_get_them(tmp_path, no_system_copy):
    with pytest.raises(NotFoundError, match="apt-get install dataset-fashion-mnist.*--data-root DIR.*--download"):
        load_split("train", tmp_path / "empty")


@pytest.mark.parametrize("fault,message", [
    ("magic", "is not an IDX file of the expected kind \\(magic 0x00000801, expected 0x00000803\\)"),
    ("truncated", "the file is truncated or damaged"),
    ("gzip", "cannot be read"),
    ("count", "40 images but 39 labels"),
    ("label", "label 12 in the train files; Fashion-MNIST has 10 classes"),
])
def test_damaged_files_are_one_line_errors(tmp_path, no_system_copy, fault, message):
    arrays = write_set(tmp_path / "fm", gz=False)
    images = tmp_path / "fm" / "train-images-idx3-ubyte"
    labels = tmp_path / "fm" / "train-labels-idx1-ubyte"
    if fault == "magic":
        images.write_bytes(idx_bytes(arrays["train-images"], LABEL_MAGIC))
    elif fault == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif fault == "gzip":
        images.unlink()
        images.with_name(images.name + ".gz").write_bytes(gzip.compress(idx_bytes(arrays["train-images"],
                                                                                  IMAGE_MAGIC))[:-50])
    elif fault == "count":
        labels.write_bytes(idx_bytes(arrays["train-labels"][:-1], LABEL_MAGIC))
    else:
        bad = arrays["train-labels"].copy()
        bad[3] = 12
        labels.write_bytes(idx_bytes(bad, LABEL_MAGIC))
    with pytest.raises(DataError, match=message) as err:
        load_split("train", tmp_path / "fm")
    assert "\n" not in str(err.value)


def test_the_dataset_serves_normalised_three_channel_images(tmp_path, no_system_copy):
    write_set(tmp_path / "fm")
    data = FashionMNISTDataset("train", 32, augment=True, root=tmp_path / "fm")
    image, label = data[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10 and len(data.classes) == 10


REAL = pytest.mark.skipif(not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
                          reason="Debian's dataset-fashion-mnist is not installed "
                                 "(apt-get install dataset-fashion-mnist)")


@REAL
def test_the_real_files():
    images, labels = load_split("test")
    assert images.shape == (10000, 28, 28) and labels.bincount().tolist() == [1000] * 10
    assert load_split("val")[1].bincount().tolist() == [500] * 10


@REAL
def test_lesa_trains_a_few_steps_on_the_real_files(tmp_path):
    from lesa.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "fashion_mnist", "--epochs", "1", "--max-steps-per-epoch", "2", "--quiet",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"][0] == "T-shirt/top" and 0 <= summary["val_top1"] <= 100


def test_the_test_split_is_reported_apart_by_train_eval_and_compare(tmp_path, no_system_copy, capsys):
    """--data-root finds the files; training reports the test split once, at the end, with best.pt; eval and
    compare read it through the run's data root; data without a test split or files to find says so."""
    from lesa.cli import main

    write_set(tmp_path / "fm", n_train=60, n_test=20)
    out, source = tmp_path / "run", ["--data", "fashion-mnist", "--data-root", str(tmp_path / "fm")]
    assert main(["train", *source, "--preset", "fashion_mnist", "--model", "resnet_tiny", "--epochs", "2",
                 "--batch-size", "16", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    history = [float(line.split(",")[4]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert summary["test_images"] == 20 and summary["test_epoch"] == 1 + int(np.argmax(history))
    assert "test split (20 images, best.pt = epoch" in capsys.readouterr().out

    assert main(["eval", "--checkpoint", str(out), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert "on fashion-mnist (test): top-1 " in printed and f"top-1 {summary['test_top1']:.2f}%" in printed
    assert main(["analyze", str(out), "--split", "test", "--image-index", "19", "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "shares.json").is_file()
    assert main(["analyze", str(out), "--split", "test", "--image-index", "20"]) == 2
    assert "--image-index 20 is outside the test split of fashion-mnist: pass one in 0..19" in \
        capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(out), "--split", "test", "--data", "digits"]) == 2
    assert "digits has no test split (fashion-mnist has one); evaluate with --split val" in capsys.readouterr().err
    digits_with_root = ["--data", "digits", "--data-root", str(tmp_path / "fm"), "--output", str(tmp_path / "d")]
    assert main(["train", *digits_with_root]) == 2
    assert "--data-root / --download tell where a named set's files are (fashion-mnist); digits has none" in \
        capsys.readouterr().err

    compare = tmp_path / "compare"
    assert main(["compare", "--quick", *source, "--ops", "conv", "--seeds", "1", "--epochs", "1", "--batch-size", "16",
                 "--output", str(compare), "--quiet"]) == 0
    table = (compare / "compare.md").read_text()
    assert "## Test split (reported once per run, with best.pt chosen by validation top-1)" in table
    row = json.loads((compare / "compare.json").read_text())["rows"][0]
    assert row["gmacs"] > 0 and 0 <= row["test_top1"] <= 100 and row["runs"][0]["wall_time_min"] > 0
    # --quick takes the set's shorter recipe: a training subset (here larger than the 54 training photos: all)
    run_config = yaml.safe_load((compare / "conv" / "seed0" / "config.yaml").read_text())
    assert run_config["preset"] == "fashion_mnist_quick" and run_config["train_subset"] == 20000


def test_the_quick_preset_is_the_full_one_shortened():
    full, quick = preset_values("fashion_mnist", PRESETS), preset_values("fashion_mnist_quick", PRESETS)
    assert "extends" not in quick and quick["model"] == full["model"] and quick["img_size"] == full["img_size"]
    assert quick["epochs"] < full["epochs"] and quick["train_subset"] == 20000


def test_the_training_subset_is_fixed_for_the_data_and_at_most_the_split():
    data = list(range(100))
    torch.manual_seed(1)
    first = training_subset(data, 30)
    torch.manual_seed(2)  # the run's seed does not choose the images: every seed sees the same ones
    assert training_subset(data, 30).indices == first.indices == sorted(set(first.indices))
    assert len(first) == 30 and [first[i] for i in range(3)] == first.indices[:3]
    assert training_subset(data, 100) is data and training_subset(data, 1000) is data
    assert training_subset(data, None) is data


def test_analyze_refuses_a_bad_split_or_image_index_before_measuring_or_writing(tmp_path, no_system_copy, capsys):
    from lesa.cli import main

    write_set(tmp_path / "fm", n_train=60, n_test=20)
    run = tmp_path / "run"
    assert main(["train", "--data", "fashion-mnist", "--data-root", str(tmp_path / "fm"), "--model", "resnet_tiny",
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--quiet",
                 "--output", str(run)]) == 0
    digits = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--model", "resnet_tiny", "--epochs", "1", "--max-steps-per-epoch",
                 "1", "--quiet", "--output", str(digits)]) == 0
    capsys.readouterr()
    for args, message in (([str(run), "--split", "test", "--image-index", "20"], "pass one in 0..19"),
                          ([str(run), "--image-index", "6"], "outside the val split of fashion-mnist"),
                          ([str(digits), "--split", "test"], "digits has no test split")):
        out = tmp_path / "analysis"
        assert main(["analyze", *args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists()  # nothing measured, nothing written


def test_a_resumed_run_keeps_its_training_subset(tmp_path, capsys):
    from lesa.cli import main

    run = ["train", "--data", "digits", "--model", "resnet_tiny", "--epochs", "2", "--max-steps-per-epoch", "1",
           "--batch-size", "8", "--quiet", "--output", str(tmp_path / "run")]
    assert main([*run[:-2], "--epochs", "1", "--train-subset", "30", "--output", str(tmp_path / "run")]) == 0
    assert main([*run, "--resume", "--train-subset", "40"]) == 2
    assert "has train_subset=30, this command train_subset=40; resume with the run's settings (--train-subset 30" \
        in capsys.readouterr().err
    assert main([*run, "--resume"]) == 0  # left out: the run's own subset
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train_subset"] == 30
