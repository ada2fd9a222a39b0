"""Image classification, a task on the one training engine (``lesa train`` / ``lesa eval`` / ``lesa analyze``):
its options (:mod:`.config`), the task (:mod:`.task`), evaluation (:mod:`.evaluate`) and the trained model for
inference (:mod:`.predict`). (The function ``evaluate`` is ``lesa.classification.evaluate.evaluate``: the
package's ``evaluate`` is the module.)"""
from .config import PRESETS, TrainConfig, build_config
from .evaluate import class_map, evaluate_checkpoint, evaluate_model
from .predict import load_trained_model, read_classifier
from .task import ClassificationTask, train

__all__ = [
    "PRESETS",
    "ClassificationTask",
    "TrainConfig",
    "build_config",
    "class_map",
    "evaluate_checkpoint",
    "evaluate_model",
    "load_trained_model",
    "read_classifier",
    "train",
]
