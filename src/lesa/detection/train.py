"""Deprecated: the detection task's modules are now :mod:`lesa.detection.config`, :mod:`~lesa.detection.task`,
:mod:`~lesa.detection.evaluate` and :mod:`~lesa.detection.predict`; this module re-exports them for one release."""
import warnings

from .config import *  # noqa: F403
from .config import DATA_DEFAULTS, EMBEDDED, coco_splits, resolved, run_detector  # noqa: F401
from .evaluate import *  # noqa: F403
from .evaluate import detect, located_data  # noqa: F401
from .predict import *  # noqa: F403
from .task import *  # noqa: F403
from .task import ap_text, eval_columns, evaluation_failed, finite  # noqa: F401

warnings.warn("lesa.detection.train is deprecated: import from lesa.detection.config, lesa.detection.task, "
              "lesa.detection.evaluate or lesa.detection.predict", DeprecationWarning, stacklevel=2)
