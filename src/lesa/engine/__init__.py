"""Training and evaluation loops, checkpoints and run records."""
from .config import TrainConfig, build_config
from .trainer import NonFiniteLossError, evaluate, evaluate_checkpoint, load_trained_model, train

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "build_config",
    "evaluate",
    "evaluate_checkpoint",
    "load_trained_model",
    "train",
]
