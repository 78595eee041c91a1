"""lightning_ttp: predict fine-tuning time before training, and give up early on runs that will fail."""

__version__ = "0.1.0"

from .api import predict_training_time  # noqa: E402
from .prediction import Prediction  # noqa: E402

__all__ = ["Prediction", "__version__", "predict_training_time"]
