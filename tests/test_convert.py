"""Official checkpoint import against the authors' recorded key layout."""
import json
from pathlib import Path

import pytest
import torch

import lesa
from lesa.cli import main
from lesa.models import create_model
from lesa.weights import load_weights

KEYS = json.loads((Path(__file__).parent / "data" / "official_lesa_resnet50_keys.json").read_text())


def official_checkpoint(pos_embed):
    """Random tensors in the official layout, as the authors' training script saves them."""
    gen = torch.Generator().manual_seed(0)
    net = {}
    for key, shape, dtype in KEYS["lesa_resnet50"][pos_embed]:
        if dtype == "int64":
            net["module." + key] = torch.randint(0, 100, shape, generator=gen)
        else:
            net["module." + key] = torch.randn(shape, generator=gen)
    return {"net": net, "optim": {"state": {}, "param_groups": []}, "epoch": 94}


def official_to_ours(key):
    """The mapping written out independently of lesa.convert, for the checks below."""
    table = {
        "qkv_transform": "binary.qkv", "bn_qkv": "binary.bn_qkv", "bn_similarity": "binary.bn_logits",
        "bn_output": "binary.bn_out", "relative": "binary.rel_pos.relative",
        "rel_height": "binary.rel_pos.height", "rel_width": "binary.rel_pos.width",
        "x_transform.0": "unary.conv", "x_transform.1": "unary.proj", "bn_x": "unary.bn",
        "reasoning.1": "fusion_gate.fc1", "reasoning.2": "fusion_gate.bn1",
        "projection.0": "fusion_gate.fc2", "projection.1": "fusion_gate.bn2",
    }
    for old, new in table.items():
        if f".conv2.{old}" in key:
            return key.replace(f".conv2.{old}", f".conv2.{new}")
    return key


@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
def test_official_checkpoint_loads_strictly(pos_embed):
    ckpt = official_checkpoint(pos_embed)
    sd = lesa.convert_official_state_dict(ckpt)
    model = create_model("lesa_resnet50", pos_embed=pos_embed)
    model.load_state_dict(sd, strict=True)
    for key, value in ckpt["net"].items():
        key = key[len("module."):]
        if key.endswith("flatten_index"):
            assert official_to_ours(key) not in sd
            continue
        ours = model.state_dict()[official_to_ours(key)]
        torch.testing.assert_close(ours, value.reshape(ours.shape).to(ours.dtype))


def test_single_layer_and_bare_dicts():
    layer_keys = {k[len("module.layer3.1.conv2."):]: v for k, v in official_checkpoint("flat")["net"].items()
                  if k.startswith("module.layer3.1.conv2.")}
    layer = lesa.LESA2d(256, 256, heads=8, feature_size=14)
    layer.load_state_dict(lesa.convert_official_state_dict(layer_keys), strict=True)
    torch.testing.assert_close(layer.binary.qkv.weight[..., 0, 0], layer_keys["qkv_transform.weight"][..., 0])


def test_mmdetection_backbone_keys():
    net = official_checkpoint("rel2d")["net"]
    ckpt = {"meta": {}, "state_dict": {"backbone." + k[len("module."):]: v for k, v in net.items()}}
    ckpt["state_dict"]["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    sd = lesa.convert_official_state_dict(ckpt)
    assert not any(k.startswith(("neck", "backbone")) for k in sd)
    create_model("lesa_resnet50", pos_embed="rel2d").load_state_dict(sd, strict=True)


def test_unknown_official_keys_are_named():
    net = official_checkpoint("flat")["net"]
    net["module.layer3.1.conv2.reasoning.4.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="layer3.1.conv2.reasoning.4.weight"):
        lesa.convert_official_state_dict(net)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    ckpt = official_checkpoint("flat")
    model = create_model("lesa_resnet50", pos_embed="rel2d")
    with pytest.raises(ValueError, match=r"(?s)missing keys.*rel_pos\.height.*unexpected keys.*rel_pos\.relative"):
        load_weights(model, ckpt)
    small = create_model("lesa_resnet50", img_size=128)
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*rel_pos\.relative.*img_size"):
        load_weights(small, ckpt)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_convert_command(tmp_path, suffix):
    src = tmp_path / "checkpoint.pth"
    torch.save(official_checkpoint("flat"), src)
    out = tmp_path / f"converted{suffix}"
    assert main(["convert", str(src), str(out), "--model", "lesa_resnet50"]) == 0
    model = create_model("lesa_resnet50", checkpoint_path=str(out))
    assert torch.equal(model.fc.weight, official_checkpoint("flat")["net"]["module.fc.weight"])


def test_convert_command_reports_bad_input(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = tmp_path / "checkpoint.pth"
    torch.save(official_checkpoint("flat"), src)
    assert main(["convert", str(src), str(tmp_path / "o.bin")]) == 2
    assert "use a file name ending in .pth or .pt or .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()


def test_lesa_state_dicts_pass_through_unchanged():
    model = create_model("lesa_resnet_tiny")
    sd = model.state_dict()
    assert not lesa.convert.is_official_state_dict(sd)
    converted = lesa.convert_official_state_dict({"model": sd})
    assert converted.keys() == sd.keys()


def test_a_run_converts_to_a_file_that_describes_it(tmp_path, digits_run, capsys):
    from lesa.weights import read_weights

    out = tmp_path / "w.safetensors"
    assert main(["convert", str(digits_run), str(out)]) == 0
    assert "described as resnet_tiny at img_size 32" in capsys.readouterr().out
    found = read_weights(out)
    assert found.kind == "described" and found.config["classes"] == [str(d) for d in range(10)]
    # it evaluates with no --model, and builds its model by itself
    assert main(["eval", "--checkpoint", str(out), "--data", "digits", "--quiet"]) == 0
    model = create_model("resnet_tiny", checkpoint_path=str(out))
    assert torch.equal(model.fc.weight, read_weights(digits_run).state_dict["fc.weight"])
    # a torch file holds the tensors alone, and says so
    assert main(["convert", str(digits_run), str(tmp_path / "w.pt")]) == 0
    assert "weights only: a .safetensors output also records" in capsys.readouterr().out


def test_shipped_weights_by_name_convert_and_keep_their_description(tmp_path, capsys):
    out = tmp_path / "fm.safetensors"
    assert main(["convert", "lesa_resnet_tiny.fashion_mnist", str(out)]) == 0
    assert "described as lesa_resnet_tiny at img_size 28" in capsys.readouterr().out
    assert create_model("lesa_resnet_tiny", checkpoint_path=str(out)).num_classes == 10
