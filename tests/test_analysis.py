"""Unary/binary shares against an independent float64 computation, the unary ablation, the commands."""
import copy
import json

import pytest
import torch
from naive_lesa import binary_term
from naive_lesa import lesa as naive_lesa
from torch.utils.data import DataLoader, TensorDataset

import lesa
from lesa.analysis import ablate_unary, analysis_slots, attention_map, gate_maps, unary_binary_shares
from lesa.cli import main
from lesa.models import create_model


def tiny(name, **kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kw).double().eval()
    with torch.no_grad():  # non-trivial BN statistics, so that the gates are not all ~0.5
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model


def loader(n=6, size=32):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)
    return DataLoader(TensorDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=4)


def layer_inputs(model, images):
    """Each analysed layer's input, captured from a plain forward pass."""
    inputs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.setdefault(n, []).append(args[0]))
               for n, m, _ in analysis_slots(model)]
    with torch.no_grad():
        for batch, _ in images:
            model(batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(xs) for n, xs in inputs.items()}


@torch.no_grad()
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
def test_sa_shares_are_the_mean_self_weight(impl, pos_embed):
    model = tiny("sa_resnet_tiny", impl=impl, pos_embed=pos_embed)
    result = unary_binary_shares(model, loader())
    inputs = layer_inputs(model, loader())
    for entry, (name, module, _) in zip(result["layers"], analysis_slots(model)):
        attn = []
        binary_term(copy.deepcopy(module.binary), inputs[name], False, attn_out=attn)
        expected = 100 * attn[0].diagonal(dim1=-2, dim2=-1).mean()
        assert entry["unary_pct"] == pytest.approx(float(expected), rel=1e-10)
        assert entry["unary_pct"] + entry["binary_pct"] == pytest.approx(100)
    assert result["unary_pct"] == pytest.approx(sum(e["unary_pct"] for e in result["layers"]) / 3)


@torch.no_grad()
def test_lesa_shares_come_from_the_fusion_gate():
    model = tiny("lesa_resnet_tiny", pos_embed="rel2d")
    result = unary_binary_shares(model, loader())
    inputs = layer_inputs(model, loader())
    for entry, (name, module, _) in zip(result["layers"], analysis_slots(model)):
        omega = []
        naive_lesa(copy.deepcopy(module), inputs[name], False, omega_out=omega)
        expected = 100 * (1 / (1 + omega[0])).mean()
        assert entry["op"] == "lesa"
        assert entry["unary_pct"] == pytest.approx(float(expected), rel=1e-10)
        assert entry["binary_pct"] == pytest.approx(100 * float((omega[0] / (1 + omega[0])).mean()), rel=1e-10)


def test_conv_static_and_aa_shares():
    assert unary_binary_shares(tiny("resnet_tiny"), loader())["unary_pct"] == 100
    static = unary_binary_shares(tiny("static_lesa_resnet_tiny"), loader())
    assert [e["unary_pct"] for e in static["layers"]] == [50, 50, 50]
    aa = unary_binary_shares(tiny("aa_resnet_tiny"), loader())
    for entry, (_, module, _) in zip(aa["layers"], analysis_slots(tiny("aa_resnet_tiny"))):
        conv_share = 100 * (module.out_channels - module.dv) / module.out_channels
        assert conv_share < entry["unary_pct"] < 100


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
def test_ablation_removes_exactly_the_diagonal_term(impl, pos_embed):
    torch.manual_seed(0)
    layer = lesa.SelfAttention2d(32, 32, heads=4, feature_size=5, pos_embed=pos_embed, impl=impl).double().eval()
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    plain = layer(x)
    with ablate_unary(layer):
        ablated = layer(x)
    assert not layer.binary.ablate_unary
    expected, _ = binary_term(copy.deepcopy(layer.binary), x, False, drop_diagonal=True)
    torch.testing.assert_close(ablated, expected, rtol=1e-10, atol=1e-10)
    assert (ablated - plain).abs().max() > 1e-3


def test_ablation_needs_eval_mode_and_attention():
    layer = lesa.SelfAttention2d(32, 32, heads=4, feature_size=5)
    with ablate_unary(layer), pytest.raises(RuntimeError, match="eval"):
        layer(torch.randn(2, 32, 5, 5))
    with pytest.raises(ValueError, match="no attention layers"):
        with ablate_unary(create_model("resnet_tiny")):
            pass


def test_maps():
    model = tiny("lesa_resnet_tiny").float()
    image = torch.randn(3, 32, 32)
    maps = gate_maps(model, image)
    assert [n for n, _ in maps] == ["layer3.1.conv2", "layer4.0.conv2", "layer4.1.conv2"]
    assert all(m.shape == (8, 8) and 0 < float(m.min()) and float(m.max()) < 1 for _, m in maps)
    name, weights, query = attention_map(model, image, query=(2, 3))
    assert name == "layer3.1.conv2" and weights.shape == (8, 8, 8) and query == (2, 3)
    torch.testing.assert_close(weights.sum(dim=(1, 2)), torch.ones(8))


def test_analyze_and_compare_commands(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--output", str(out), "--ops", "conv", "sa", "lesa", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--seeds", "1", "--quiet"]
    assert main(args) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["operation"] for r in rows] == ["conv", "sa", "sa_minus_unary", "lesa"]
    for row in rows:
        assert set(row) >= {"operation", "params", "val_top1", "val_top5", "unary_pct", "binary_pct"}
        assert row["unary_pct"] + row["binary_pct"] == pytest.approx(100) or row["operation"] == "sa_minus_unary"
    assert rows[0]["unary_pct"] == 100
    table = (out / "compare.md").read_text()
    assert "Table 1" in table and "SA - unary term" in table and "Table 2" in table and "Table 6" in table
    assert "Table 6" in capsys.readouterr().out
    for name in ("compare_curves.png", "compare_shares.png", "analysis_lesa/gate_maps.png",
                 "analysis_lesa/attention_map.png", "analysis_sa/shares.png"):
        assert (out / name).is_file(), name
    # finished runs are reused, not retrained
    stamp = (out / "lesa" / "seed0" / "last.pt").stat().st_mtime
    assert main(args) == 0
    assert (out / "lesa" / "seed0" / "last.pt").stat().st_mtime == stamp

    assert main(["eval", "--checkpoint", str(out / "sa" / "seed0"), "--ablate-unary", "--quiet"]) == 0
    assert "without the unary term" in capsys.readouterr().out
    assert main(["analyze", str(out / "lesa" / "seed0"), "--output", str(tmp_path / "an"), "--max-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "unary" in printed and (tmp_path / "an" / "shares.json").is_file()
