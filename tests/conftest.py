import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A finished one-epoch classification run of resnet_tiny on the embedded digits (two steps), made once for
    the session: tests read it and may point commands at it that must refuse, but write nothing into it."""
    from lesa.cli import main

    out = tmp_path_factory.mktemp("digits_run") / "run"
    assert main(["train", "--model", "resnet_tiny", "--epochs", "1", "--batch-size", "16", "--max-steps-per-epoch",
                 "2", "--quiet", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def digit_scenes(tmp_path_factory) -> Path:
    """A small COCO root of digit scenes (two training images, one validation image), made once: read only."""
    from lesa.data.digit_scenes import ensure_digit_scenes

    return ensure_digit_scenes(tmp_path_factory.mktemp("scenes"), counts={"train": 2, "val": 1})
