"""The cluttered-digits set (deterministic, no leakage between splits) and the multi-seed compare (its
means and spreads are those of the per-seed runs; it reuses only runs trained with its options)."""
import json

import numpy as np
import pytest
import torch
import yaml
from helpers import cli

from lesa.cli import main
from lesa.data import EMBEDDED, build_classification_data
from lesa.data import cluttered_digits as cd
from lesa.data.digits import load_digits_split


def test_cluttered_digits_is_deterministic_and_independent_of_torch_rng():
    torch.manual_seed(0)
    first = cd.ClutteredDigitsDataset("val", 32)
    cd.generate_split.cache_clear()  # regenerate from scratch, under another global RNG state
    torch.manual_seed(1234)
    torch.rand(1000)
    np.random.seed(99)
    second = cd.ClutteredDigitsDataset("val", 32)
    assert first.images is not second.images
    assert first.images.numpy().tobytes() == second.images.numpy().tobytes()
    assert torch.equal(first.targets, second.targets)
    assert torch.equal(first.distractor_sources, second.distractor_sources)


def test_cluttered_digits_shapes_classes_and_registration():
    assert EMBEDDED["cluttered-digits"] is cd.ClutteredDigitsDataset
    data = build_classification_data("cluttered-digits", 32)
    train, val = data.train, data.val
    assert data.classes == [str(i) for i in range(10)]
    assert len(train) == 2 * 1437 and len(val) == 3 * 360
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert float(image.min()) >= -1 and float(image.max()) <= 1
    assert torch.bincount(val.targets, minlength=10).min() >= 3 * 35  # every class, as stratified
    assert train.augment is not None and val.augment is None
    assert cd.ClutteredDigitsDataset("val", 48)[0][0].shape == (3, 48, 48)
    # the target box holds the upsampled target digit: the canvas is at least as bright there
    raw = cd.generate_split("val")
    x0, y0, x1, y1 = raw.target_boxes[0].tolist()
    assert x1 - x0 == y1 - y0 and cd.TARGET_SIDES[0] <= x1 - x0 <= cd.TARGET_SIDES[1]
    assert float(raw.images[0, y0:y1, x0:x1].sum()) > 0.5 * float(raw.images[0].sum()) / cd.DISTRACTORS


def test_cluttered_digits_splits_use_disjoint_source_digits():
    train, val = cd.generate_split("train"), cd.generate_split("val")
    train_sources = set(train.target_source.tolist()) | set(train.distractor_sources.flatten().tolist())
    val_sources = set(val.target_source.tolist()) | set(val.distractor_sources.flatten().tolist())
    assert train_sources <= set(cd.split_indices("train").tolist())
    assert val_sources <= set(cd.split_indices("val").tolist())
    assert not train_sources & val_sources
    # the same split as the digits set, and a target is never its own distractor
    from sklearn.datasets import load_digits

    images, labels = load_digits_split("val")
    digits = load_digits()
    np.testing.assert_allclose(digits.images[cd.split_indices("val")] / 16.0, images.numpy())
    assert (digits.target[val.target_source.numpy()] == val.targets.numpy()).all()
    assert not (val.distractor_sources == val.target_source[:, None]).any()


def test_compare_reports_mean_and_std_over_seed_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--data", "cluttered-digits", "--output", str(out), "--ops", "conv", "sa",
            "--seeds", "2", "--seed", "3", "--epochs", "1", "--max-steps-per-epoch", "2", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [3, 4] and report["data"] == "cluttered-digits"
    rows = {r["operation"]: r for r in report["rows"]}
    assert list(rows) == ["conv", "sa", "sa_minus_unary"]
    for op in ("conv", "sa"):
        summaries = [json.loads((out / op / f"seed{s}" / "summary.json").read_text()) for s in (3, 4)]
        assert [yaml.safe_load((out / op / f"seed{s}" / "config.yaml").read_text())["seed"] for s in (3, 4)] == [3, 4]
        for key in ("val_top1", "val_top5", "val_loss"):
            values = np.array([s[key] for s in summaries])
            assert rows[op][key] == pytest.approx(values.mean())
            assert rows[op][f"{key}_std"] == pytest.approx(values.std(ddof=1))
            assert [r[key] for r in rows[op]["runs"]] == pytest.approx(list(values))
        assert rows[op]["n_seeds"] == 2 and [r["seed"] for r in rows[op]["runs"]] == [3, 4]
    # the seeds are different runs, the ablation's spread comes from its own per-seed evaluations
    sa_runs = rows["sa"]["runs"]
    assert sa_runs[0]["val_loss"] != sa_runs[1]["val_loss"]
    ablated = rows["sa_minus_unary"]
    increases = [r["val_top1"] - a["val_top1"] for r, a in zip(sa_runs, ablated["runs"])]
    assert ablated["top1_err_increase"] == pytest.approx(np.mean(increases))
    assert ablated["top1_err_increase_std"] == pytest.approx(np.std(increases, ddof=1))
    assert ablated["val_loss_std"] == pytest.approx(np.std([a["val_loss"] for a in ablated["runs"]], ddof=1))
    table = (out / "compare.md").read_text()
    conv = rows["conv"]
    assert f"{conv['val_top1']:.2f} ± {conv['val_top1_std']:.2f}" in table
    assert "over 2 seeds (3, 4)" in table and "Table 1" in table and "Table 6" in capsys.readouterr().out
    assert (out / "compare_curves.png").is_file() and (out / "analysis_sa" / "shares.png").is_file()


def test_compare_refuses_runs_trained_with_other_options(tmp_path):
    args = ["compare", "--quick", "--ops", "conv", "--seeds", "1", "--max-steps-per-epoch", "1", "--quiet",
            "--output", tmp_path / "cmp"]
    assert cli(*args, "--epochs", "1")[0] == 0
    code, err = cli(*args, "--epochs", "2")
    assert code == 2 and "trained with other options: epochs=1 (this comparison: 2)" in err
