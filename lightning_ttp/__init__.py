"""lightning_ttp: predict fine-tuning time before training, and give up early on runs that will fail.

``import lightning_ttp`` does not import Lightning: the callbacks and bars are resolved on
first attribute access (PEP 562), so the math layers stay usable without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .api import predict_training_time  # noqa: E402
from .pipeline.prediction import Prediction  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import EarlyGiveUp, ETAProgressBar, RichETAProgressBar, TrainingTimePredictor

_LAZY = {
    "EarlyGiveUp": "lightning_ttp.callbacks",
    "ETAProgressBar": "lightning_ttp.callbacks",
    "RichETAProgressBar": "lightning_ttp.callbacks",
    "TrainingTimePredictor": "lightning_ttp.callbacks",
}

__all__ = [
    "ETAProgressBar",
    "EarlyGiveUp",
    "Prediction",
    "RichETAProgressBar",
    "TrainingTimePredictor",
    "__version__",
    "predict_training_time",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_ttp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
