"""The one training engine (run directory, loop, checkpoints, resume, DDP, logging) and the
classification task that ``lesa train`` / ``lesa eval`` run on it. Other tasks (``lesa.detection``)
implement :class:`Task` and train with :func:`run_task`."""
from .checkpoint import load_checkpoint, run_kind
from .classification import (
    ClassificationTask,
    evaluate,
    evaluate_checkpoint,
    evaluate_model,
    load_trained_model,
    train,
)
from .config import RunConfig, TrainConfig, build_config, load_yaml, merge_config
from .distributed import DistContext, resolve_device, setup_distributed
from .loop import (
    Engine,
    Runtime,
    ShardSampler,
    SkippedImages,
    Step,
    Task,
    run_task,
    warmup_cosine,
    warmup_multistep,
)
from .records import TensorBoard, read_metrics_csv, write_json

__all__ = [
    "ClassificationTask",
    "DistContext",
    "Engine",
    "RunConfig",
    "Runtime",
    "ShardSampler",
    "SkippedImages",
    "Step",
    "Task",
    "TensorBoard",
    "TrainConfig",
    "build_config",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_model",
    "load_checkpoint",
    "load_trained_model",
    "load_yaml",
    "merge_config",
    "read_metrics_csv",
    "resolve_device",
    "run_kind",
    "run_task",
    "setup_distributed",
    "train",
    "warmup_cosine",
    "warmup_multistep",
    "write_json",
]
