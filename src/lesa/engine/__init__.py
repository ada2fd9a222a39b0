"""The one training engine (run directory, loop, checkpoints, resume, DDP, records, the config merge). It knows
no task: the tasks (``lesa.classification``, ``lesa.detection``) implement :class:`Task` and train with
:func:`run_task`."""
from .checkpoint import load_checkpoint
from .config import RunConfig, load_yaml, merge_config, merge_values
from .distributed import DistContext, resolve_device, setup_distributed
from .loop import Engine, run_task
from .records import TensorBoard, read_metrics_csv, write_json
from .task import Runtime, ShardSampler, SkippedImages, Step, Task, warmup_cosine, warmup_multistep

__all__ = [
    "DistContext",
    "Engine",
    "RunConfig",
    "Runtime",
    "ShardSampler",
    "SkippedImages",
    "Step",
    "Task",
    "TensorBoard",
    "load_checkpoint",
    "load_yaml",
    "merge_config",
    "merge_values",
    "read_metrics_csv",
    "resolve_device",
    "run_task",
    "setup_distributed",
    "warmup_cosine",
    "warmup_multistep",
    "write_json",
]
