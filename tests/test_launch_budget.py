"""The block policy of the fused kernels (``lesa.layers.rel2d_attention.block_sizes``) and what it buys on a GPU.

Under the CUDA policy (forced on the CPU with ``LESA_BLOCK_POLICY=cuda``, where its memory budget is the
nominal one) a layer's forward + backward dispatches a fixed number of ATen operations -- each a kernel
launch on a GPU -- whatever the batch (counted by ``benchmarks/gpu_check.py`` over fake tensors: shapes only),
and 'rel2d' splits its keys where one call would be wider than flash attention takes, exactly. The CPU policy
keeps the cache-sized blocks the CPU figures were measured with. docs/performance.md, "Launch budget".
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_step, bn_affines

from lesa.errors import ConfigError
from lesa.layers import BinaryAttention2d
from lesa.layers import rel2d_attention as rel2d_module
from lesa.layers.padding import batch_padding
from lesa.layers.rel2d_attention import (
    CUDA_EFFICIENT,
    CUDA_FLASH,
    FLASH_MAX_WIDTH,
    block_sizes,
    flash_key_groups,
    rel2d_attention,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import LAUNCH_CASES, layer_ops  # noqa: E402

F64, CPU = torch.float64, torch.device("cpu")
# ATen operations of one layer's forward + backward under the CUDA policy, at any batch; measured (256
# channels): 'flat' 14x14 700 / 301, 'flat' 32x32 725 / 302, 'rel2d' 32x32 404 / 198 (training / eval)
LAUNCH_BUDGET = {"train": 800, "eval": 350}


@pytest.fixture
def cuda_policy(monkeypatch):
    monkeypatch.setenv("LESA_BLOCK_POLICY", "cuda")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("pos_embed,size,heads", LAUNCH_CASES)
def test_cuda_policy_launches_do_not_grow_with_the_batch(pos_embed, size, heads, mode, cuda_policy):
    counts = [layer_ops(pos_embed, size, heads, batch, mode == "train") for batch in (8, 64, 256)]
    assert counts[0] == counts[1] == counts[2] <= LAUNCH_BUDGET[mode], counts


def test_the_count_sees_the_cpu_policy_blocks_multiply(monkeypatch):
    """The same counter under the CPU policy: its dense-kernel row blocks shrink as the batch grows."""
    monkeypatch.setenv("LESA_BLOCK_POLICY", "cpu")
    assert layer_ops("flat", 14, 8, 4, True) > layer_ops("flat", 14, 8, 2, True) > LAUNCH_BUDGET["train"]


def test_cpu_policy_keeps_the_cache_sized_blocks(monkeypatch):
    """2**21 logits per query block, 2**19 elements per dense temporary, 16 key rows (worked by hand)."""
    monkeypatch.delenv("LESA_BLOCK_POLICY", raising=False)
    assert block_sizes(CPU, torch.float32, 8 * 8, 14, 14, 16) == (167, 20, 14, 14)  # 2**21 // (64 * 196)
    assert block_sizes(CPU, torch.float32, 8, 64, 64, 16) == (64, 8, 16, 64)
    assert block_sizes(CPU, torch.float32, 256 * 8, 14, 14, 16) == (5, 1, 14, 14)
    assert block_sizes(CPU, torch.float32, 8, 64, 64, query_elems=8 * 4096 * 3).queries == 3
    monkeypatch.setenv("LESA_BLOCK_POLICY", "")  # empty: unset
    assert block_sizes(CPU, torch.float64, 8 * 8, 14, 14, 16) == (167, 20, 14, 14)


def test_cuda_policy_blocks_are_as_large_as_the_budget(cuda_policy):
    """32 GiB (a quarter of the nominal 128 GiB free) over 9 (blocked) / 5 (dense) float32 logit tensors."""
    elems = (128 << 30) // 4 // 4
    assert block_sizes(CPU, torch.float32, 256 * 8, 14, 14)[:2] == (196, 196)  # the paper's size: one block
    assert block_sizes(CPU, torch.bfloat16, 3105 * 8, 14, 14).queries == 196  # softmax in float32
    assert block_sizes(CPU, torch.float32, 3106 * 8, 14, 14).queries == 195
    assert block_sizes(CPU, torch.float32, 256 * 8, 32, 32)[:2] == (elems // (9 * 2048 * 1024),
                                                                      elems // (5 * 2048 * 1024))
    assert block_sizes(CPU, torch.float64, 256 * 2, 32, 32)[:2] == (elems // 2 // (9 * 512 * 1024), 1024)


@pytest.mark.parametrize("height,width,head_width,expected", [
    (120, 120, 16, (120, 120)),  # d + H + W = 256: one call
    (128, 128, 16, (64, 128)),  # whole rows: two groups of 64 (widths 208)
    (256, 256, 16, (128, 86)),  # a row is too wide: tiles of 128 x 86 (6 of them, widths 230)
    (7, 300, 100, (7, 100)),  # few rows leave the columns more room: 3 tiles of 7 x 100
    (40, 40, 255, (1, 1)),
])
def test_flash_key_groups_stay_within_flash_width(height, width, head_width, expected):
    rows, cols = flash_key_groups(height, width, head_width)
    assert (rows, cols) == expected
    assert head_width + rows + cols <= max(FLASH_MAX_WIDTH, head_width + 2)


def test_invalid_policy_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("LESA_BLOCK_POLICY", "gpu")
    with pytest.raises(ConfigError, match=r"^LESA_BLOCK_POLICY='gpu' is not a block policy: use cpu or cuda") as err:
        block_sizes(CPU, torch.float32, 1, 4, 4)
    assert "\n" not in str(err.value)


def spy_groups(monkeypatch) -> list:
    """Records the key groups KeyRowSplitAttention runs (forward and backward)."""
    groups = []
    real = rel2d_module.key_groups
    monkeypatch.setattr(rel2d_module, "key_groups", lambda *a: groups.extend(real(*a)) or real(*a))
    return groups


@pytest.mark.parametrize("head_width,group", [(200, (14, 40)), (230, (14, 10))])
def test_key_split_under_cuda_policy_is_exact(head_width, group, cuda_policy, monkeypatch):
    """d + H + W > 256 at 40x40: groups of whole rows (d = 200) or tiles (d = 230), against the softmax of the
    materialised logits in float64, forward and backward."""
    groups = spy_groups(monkeypatch)
    gen = torch.Generator().manual_seed(head_width)
    n, g, height, width, dv = 1, 2, 40, 40, 24
    shapes = [(n, g, height * width, s) for s in (head_width, head_width, dv, height, width)]
    q, k, v, rows, cols = (torch.randn(*s, generator=gen, dtype=F64, requires_grad=True) for s in shapes)
    q = (q * head_width ** -0.5).detach().requires_grad_()
    logits = q @ k.transpose(-1, -2) + (rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)
    expected = torch.softmax(logits, dim=-1) @ v
    out = rel2d_attention(q, k, v, rows, cols)
    assert type(out.grad_fn).__name__ == "KeyRowSplitAttentionBackward"
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    grad = torch.randn(expected.shape, generator=gen, dtype=F64)
    inputs = (q, k, v, rows, cols)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    sizes = {(r.stop - r.start, c.stop - c.start) for r, c in groups}
    assert max(sizes) == group and all(head_width + r + c <= FLASH_MAX_WIDTH for r, c in sizes)


def wide_pair(out_channels):
    """A 'rel2d' reference layer with one head of width ``out_channels / 2`` at 24x24, and its fused copy."""
    torch.manual_seed(0)
    ref = BinaryAttention2d(16, out_channels, heads=1, pos_embed="rel2d", feature_size=24, impl="reference")
    ref = bn_affines(ref.double())
    fused = copy.deepcopy(ref)
    fused.impl = "fused"
    return ref, fused


@pytest.mark.parametrize("out_channels,group", [(440, (12, 24)), (472, (12, 8))])
def test_wide_rel2d_layer_under_cuda_policy_equals_reference(out_channels, group, cuda_policy, monkeypatch):
    """Head width 220 / 236 at 24x24 (d + H + W = 268 / 284): the layer splits its keys into row groups /
    tiles and computes the reference's outputs, gradients and BN statistics (float64), also with padding."""
    groups = spy_groups(monkeypatch)
    ref, fused = wide_pair(out_channels)
    x = torch.randn(2, 16, 24, 24, dtype=F64)
    assert_same_step(ref.train(), fused.train(), x, F64)
    assert_same_step(ref.eval(), fused.eval(), x, F64)
    padded = lambda: batch_padding(torch.tensor([[24, 24], [17, 9]]), (24, 24))  # noqa: E731
    assert_same_step(ref.train(), fused.train(), x, F64, padded)
    assert {(r.stop - r.start, c.stop - c.start) for r, c in groups} >= {group}


def test_flat_layer_under_cuda_policy_is_one_exact_block(cuda_policy, monkeypatch):
    """'flat' at 20x20 ('auto': the blocked path on a CPU) is one block of all queries: the dense kernel."""
    from lesa.layers import flat_attention

    calls = []
    monkeypatch.setattr(flat_attention.FlatDenseAttention, "forward",
                        lambda ctx, *a, f=flat_attention.FlatDenseAttention.forward: calls.append(1) or f(ctx, *a))
    torch.manual_seed(0)
    ref = BinaryAttention2d(32, 32, heads=4, pos_embed="flat", feature_size=20, impl="reference").double()
    fused = copy.deepcopy(ref)
    fused.impl = "auto"
    x = torch.randn(2, 32, 20, 20, dtype=F64)
    assert_same_step(ref.train(), fused.train(), x, F64)
    assert len(calls) == 1


@pytest.mark.parametrize("kernel,dtype", [(CUDA_FLASH, torch.bfloat16), (CUDA_EFFICIENT, torch.float32)])
def test_cuda_kernel_calls_on_meta_tensors(kernel, dtype):
    """The private CUDA kernels' arguments and results (shapes, log-sum-exp per query), checked on the meta
    device, which runs PyTorch's own shape functions for them."""
    q = torch.empty(2, 3, 50, 48, device="meta", dtype=dtype)
    k, v = (torch.empty(2, 3, 70, 48, device="meta", dtype=dtype) for _ in range(2))
    out, lse = kernel.forward(q, k, v)
    assert out.shape == q.shape and lse.shape == (2, 3, 50) and lse.dtype == torch.float32
    grads = kernel.backward(out, q, k, v, out, lse)
    assert [t.shape for t in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_key_split_matches_float64(dtype):
    """The key split on CUDA (flash in half precision, memory-efficient in float32: tiles of 14 x 10 keys at
    d = 230) against float64 on the CPU, output and gradients."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 40 * 40, s) for s in (230, 230, 32, 40, 40)]
    inputs = [torch.randn(*s, generator=gen, dtype=F64) for s in shapes]
    inputs[0] = inputs[0] * 230 ** -0.5
    inputs = [t.requires_grad_() for t in inputs]
    q, k, v, rows, cols = inputs
    logits = q @ k.transpose(-1, -2) + (rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)
    expected = torch.softmax(logits, dim=-1) @ v
    expected.square().sum().backward()
    args = [t.detach().cuda().to(dtype).requires_grad_() for t in inputs]
    out = rel2d_attention(*args)
    assert type(out.grad_fn).__name__ == "KeyRowSplitAttentionBackward"
    out.float().square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rel = lambda a, b: ((a.double().cpu() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, expected) < tol
    for got, want in zip(args, inputs):
        assert rel(got.grad, want.grad) < 3 * tol
