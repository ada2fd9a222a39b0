"""bfloat16 / float16 without a GPU: autocast on the CPU trains with finite losses, the
forward stays within bfloat16 rounding of float32, the fused kernels keep their softmax in float32, and a
BN-calibrated model's eval logits stay finite and within float16 rounding of float32."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lesa import LESA2d, create_model
from lesa.data import DigitsDataset

SOFTMAX = {"aten._softmax.default", "aten._softmax_backward_data.default", "aten._log_softmax.default"}


class SoftmaxDtypes(TorchDispatchMode):
    """Records the dtype of every softmax (and its backward) dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SOFTMAX:
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def digits_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataset("train", 32)
    images, labels = zip(*(data[i] for i in range(n)))
    return torch.stack(images), torch.tensor(labels)


def test_bf16_autocast_trains_with_finite_losses_close_to_float32():
    torch.manual_seed(0)
    model = create_model("lesa_resnet_tiny", num_classes=10)
    x, y = digits_batch()
    model.eval()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert float((low.float() - full).norm() / full.norm()) < 3e-2  # bfloat16 keeps 8 bits of mantissa
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("pos_embed", ["flat", "rel2d"])
@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
def test_softmax_stays_float32_under_autocast(pos_embed, impl):
    layer = LESA2d(16, 16, heads=4, pos_embed=pos_embed, feature_size=10, impl=impl).train()
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    with SoftmaxDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    with SoftmaxDtypes() as seen_backward:
        out.float().square().sum().backward()
    assert seen.dtypes | seen_backward.dtypes <= {torch.float32}, seen.dtypes | seen_backward.dtypes
    assert torch.isfinite(x.grad).all()


def test_fp16_eval_logits_stay_finite_after_calibration():
    torch.manual_seed(0)
    model = create_model("lesa_resnet_tiny", num_classes=10)
    x, _ = digits_batch(32)
    model.train()
    with torch.no_grad():
        for _ in range(5):  # calibrate the BatchNorm statistics on real images
            model(x)
    model.eval()
    with torch.no_grad():
        full = model(x * 3)
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x * 3)  # inputs at three times the training scale
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    assert float((logits.float() - full).norm() / full.norm()) < 1e-2  # float16 keeps 11 bits of mantissa
