"""Comparing two implementations of a layer over one training / eval step (test_fused, test_padding)."""
import contextlib

import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def assert_close(actual, expected, dtype, name=""):
    """Relative agreement: elementwise to ``rtol`` of the tensor's scale (tiny entries are not judged
    on their own relative error, which float32 rounding makes meaningless)."""
    rtol = RTOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.detach().abs().max()),
                               msg=lambda m: f"{name}: {m}")


def assert_same_step(ref, fused, x, dtype, context=contextlib.nullcontext):
    """One forward (inside ``context()``) and backward (outside it: checkpointed layers recompute there) in the
    modules' current mode: outputs, all gradients, BN buffers."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with context():
        ya, yb = ref(xa), fused(xb)
    assert_close(yb, ya, dtype, "output")
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert_close(xb.grad, xa.grad, dtype, "input gradient")
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if name.endswith("bn_logits.bias"):  # softmax is shift invariant: zero up to rounding in both
            assert max(a.grad.abs().max(), b.grad.abs().max()) < 1e-3 * ya.detach().abs().max()
            continue
        assert_close(b.grad, a.grad, dtype, name)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        assert_close(b.to(a.dtype), a, dtype, name)
