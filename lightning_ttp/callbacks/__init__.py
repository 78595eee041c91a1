"""Lightning callbacks (the only layer that imports Lightning)."""

from .early_give_up import EarlyGiveUp
from .predictor import TrainingTimePredictor
from .progress import ETAProgressBar, RichETAProgressBar

__all__ = [
    "EarlyGiveUp",
    "ETAProgressBar",
    "RichETAProgressBar",
    "TrainingTimePredictor",
]
