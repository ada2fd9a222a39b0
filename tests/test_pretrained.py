"""The weights shipped inside the package (the tiny models trained on Fashion-MNIST): they load with one line
through lesa and timm, offline, describe themselves in ``pretrained_cfg``, serve every command by their tagged
name (class folders matched by safe names, their own data when none is given), and reach the stated test top-1
on the real test photos where Debian's dataset-fashion-mnist is installed."""
import pytest
import timm
import torch
from helpers import cli
from PIL import Image

from lesa import create_model
from lesa.data.fashion_mnist import DEBIAN_DIR, FashionMNISTDataset
from lesa.errors import CheckpointError, ConfigError
from lesa.models.pretrained import TAG, pretrained_info, pretrained_path, shipped_models

SHIPPED = ("resnet_tiny", "sa_resnet_tiny", "aa_resnet_tiny", "static_lesa_resnet_tiny", "lesa_resnet_tiny")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_every_compared_operation_ships_small_float16_weights():
    assert shipped_models() == sorted(SHIPPED)
    total = sum(pretrained_path(name).stat().st_size for name in SHIPPED)
    assert total < 10e6  # "a few MB in all"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_load_with_one_line_and_describe_themselves(name):
    model = create_model(name, pretrained=True)
    info = pretrained_info(name)
    stored = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(pretrained_path(name))))
    assert all(torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype)) for k, v in stored.items())
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 28, 28) and cfg["num_classes"] == 10 and list(cfg["label_names"]) == CLASSES
    assert cfg["tag"] == "fashion_mnist" and cfg["license"].startswith("MIT")
    assert f"test top-1 {info['test_top1']:.2f}%" in cfg["description"] and "Fashion-MNIST" in cfg["description"]
    assert 75 < info["test_top1"] < 100 and info["command"].startswith("lesa train --data fashion-mnist")
    model.eval()
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)


def test_timm_loads_the_shipped_weights_by_name_and_tag():
    ours = create_model("lesa_resnet_tiny", pretrained=True).state_dict()
    for name in ("lesa_resnet_tiny", "lesa_resnet_tiny.fashion_mnist"):
        model = timm.create_model(name, pretrained=True)
        assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
        assert model.pretrained_cfg["tag"] == "fashion_mnist" and model.pretrained_cfg["input_size"] == (3, 28, 28)
    with pytest.raises(ConfigError, match="has the pretrained tags fashion_mnist"):
        timm.create_model("lesa_resnet_tiny.in1k", pretrained=True)


def test_timm_lists_the_shipped_weights_and_the_tag_picks_their_configuration():
    """timm.list_pretrained('*lesa*') was empty; the untagged name stays untrained at the default input size."""
    assert timm.list_pretrained("*resnet_tiny*") == sorted(f"{name}.fashion_mnist" for name in SHIPPED)
    assert not timm.is_model_pretrained("lesa_resnet_tiny")  # the untagged default has no weights
    assert timm.get_pretrained_cfg("lesa_resnet_tiny.fashion_mnist").input_size == (3, 28, 28)
    tagged = timm.create_model("lesa_resnet_tiny.fashion_mnist")  # timm's rule: configuration, no weights
    assert tagged.pretrained_cfg["input_size"] == (3, 28, 28) and tagged.pretrained_cfg["num_classes"] == 10
    assert not torch.equal(tagged.fc.weight, create_model("lesa_resnet_tiny", pretrained=True).fc.weight)
    plain = timm.create_model("lesa_resnet_tiny")
    assert plain.pretrained_cfg["input_size"] == timm.get_pretrained_cfg("lesa_resnet_tiny").input_size
    assert not plain.pretrained_cfg.get("file") and plain.pretrained_cfg.get("tag") is None
    # the overlay's input size wins over the tag's, as for the untagged name (model and cfg agree)
    sized = timm.create_model("lesa_resnet_tiny.fashion_mnist", pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))
    assert sized.pretrained_cfg["input_size"] == (3, 64, 64)
    assert sized.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(CheckpointError, match="drop the option.s. .pretrained_cfg_overlay input_size."):
        timm.create_model("lesa_resnet_tiny.fashion_mnist", pretrained=True,
                          pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))
    assert timm.create_model("lesa_resnet_tiny", pretrained=True, pretrained_cfg="").pretrained_cfg["tag"] == TAG
    with pytest.raises(ConfigError, match="lesa's model names take no tag; use 'lesa_resnet_tiny' .with pretrained"):
        create_model("lesa_resnet_tiny.fashion_mnist", pretrained=True)
    with pytest.raises(ConfigError, match="drop pretrained_cfg to load the shipped lesa_resnet_tiny weights"):
        timm.create_model("lesa_resnet_tiny", pretrained=True,
                          pretrained_cfg=timm.get_pretrained_cfg("lesa_resnet_tiny"))


def test_fine_tuning_the_shipped_weights_for_another_class_count():
    with pytest.warns(UserWarning, match="classifier"):
        model = create_model("lesa_resnet_tiny", pretrained=True, num_classes=4)
    assert model.fc.out_features == 4 and "label_names" not in model.pretrained_cfg
    shipped = create_model("lesa_resnet_tiny", pretrained=True)
    assert torch.equal(model.conv1.weight, shipped.conv1.weight)
    with pytest.raises(ConfigError, match="only, not lesa_resnet50"):
        create_model("lesa_resnet50", pretrained=True)
    with pytest.raises(ConfigError, match="pass one"):
        create_model("lesa_resnet_tiny", pretrained=True, checkpoint_path="x.pt")


@pytest.mark.skipif(not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_the_shipped_lesa_reaches_its_stated_test_top1_on_the_real_photos():
    model = create_model("lesa_resnet_tiny", pretrained=True).eval()
    test = FashionMNISTDataset("test", img_size=28)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(test), 500):
            images, labels = zip(*(test[i] for i in range(start, min(start + 500, len(test)))))
            correct += (model(torch.stack(images)).argmax(1) == torch.tensor(labels)).sum().item()
    # the stated figure was measured the same way; a different BLAS may flip a few borderline photos
    assert abs(100 * correct / len(test) - pretrained_info("lesa_resnet_tiny")["test_top1"]) <= 0.05


@pytest.mark.parametrize("name", ["lesa_resnet_tiny", "resnet_tiny"])
def test_a_shipped_file_names_its_model_and_input_size_to_eval_export_and_init(name):
    # `lesa eval/export/analyze FILE` and `lesa train --init FILE` read the file's own description: the model,
    # its 28 px input (a table of the default 32 px would not fit) and the class names
    from lesa.classification import load_trained_model
    from lesa.classification.config import with_init_run

    model, cfg = load_trained_model(pretrained_path(name))
    assert cfg["model"] == name and cfg["img_size"] == 28 and cfg["classes"] == CLASSES
    shipped = create_model(name, pretrained=True).state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    values = with_init_run({"init": str(pretrained_path(name))}, {})
    assert values["model"] == name and values["img_size"] == 28


def test_options_the_shipped_weights_do_not_fit_and_bad_cfg_types_are_named():
    from lesa.errors import CheckpointError

    for build in (create_model, timm.create_model):
        for option in (dict(img_size=32), dict(in_chans=1)):
            with pytest.raises(CheckpointError, match=rf"img_size=28 .*drop the option\(s\) \({next(iter(option))}\)"):
                build("lesa_resnet_tiny", pretrained=True, **option)
    with pytest.raises(ConfigError, match="pretrained_cfg=123: pass a tag"):
        timm.create_model("lesa_resnet_tiny", pretrained=True, pretrained_cfg=123)
    with pytest.raises(ConfigError, match="pretrained_cfg_overlay='x': pass a dict"):
        timm.create_model("lesa_resnet_tiny", pretrained=True, pretrained_cfg_overlay="x")


def test_analyzing_shipped_weights_never_writes_into_the_package(tmp_path):
    from pathlib import Path

    from lesa.analysis.report import default_analysis_dir

    shipped = pretrained_path("lesa_resnet_tiny")
    assert default_analysis_dir(shipped, "lesa_resnet_tiny") == Path("runs") / "analysis-lesa_resnet_tiny"
    assert default_analysis_dir(tmp_path, "x") == tmp_path / "analysis"
    assert default_analysis_dir(tmp_path / "best.pt", "x") == tmp_path / "analysis"


def test_shipped_weights_by_name_and_class_folders_with_safe_names(tmp_path):
    classes = pretrained_info("resnet_tiny")["classes"]
    val = tmp_path / "mine" / "val"  # no train/: evaluation reads the split it evaluates only
    for k, name in enumerate(classes):
        (val / name.replace("/", "_")).mkdir(parents=True)
        Image.new("L", (28, 28), 20 * k).save(val / name.replace("/", "_") / "0.png")
    code, _ = cli("eval", "--checkpoint", "resnet_tiny.fashion_mnist", "--data", tmp_path / "mine", "--quiet")
    assert code == 0
    assert cli("export", "resnet_tiny.fashion_mnist", tmp_path / "m.pt2", "--no-check")[0] == 0
    code, err = cli("eval", "--checkpoint", "resnet_tiny.fashion_mnist", "--data", "digits")
    assert code == 2 and "a '/' in a class name is '_' in its folder's" in err


def test_a_shipped_model_without_data_uses_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr("lesa.data.fashion_mnist.DEBIAN_DIR", tmp_path / "none")  # not installed here
    code, err = cli("eval", "--checkpoint", "resnet_tiny.fashion_mnist")
    assert code == 2 and "Fashion-MNIST's IDX files were not found" in err  # its own data, and how to get it
