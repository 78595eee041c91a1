"""Progress bars that show the predicted convergence step and the ETA.

``ETAProgressBar`` (tqdm) and ``RichETAProgressBar`` (rich) are Lightning's own bars with one
addition: when a :class:`~lightning_ttp.callbacks.TrainingTimePredictor` is among the
Trainer's callbacks, the training bar shows

    converges ≈ step 412 · ETA 3:12 · run ends 9:40

(the headline-ε convergence step — refined from the real losses as they arrive — the time
until then and the time until the end of the run, from the measured seconds per optimiser
step). Without a predictor, or before its prediction exists, they are the normal bars.
The text is only recomputed when the bar itself refreshes (``refresh_rate``) and then costs
a few arithmetic operations.
"""

from __future__ import annotations

from typing import Any

from ._compat import bases
from .predictor import TrainingTimePredictor

__all__ = ["ETAProgressBar", "RichETAProgressBar", "find_predictor"]


def find_predictor(trainer: Any) -> TrainingTimePredictor | None:
    """The first :class:`TrainingTimePredictor` among ``trainer.callbacks`` (None if none)."""
    for callback in getattr(trainer, "callbacks", []) or []:
        if isinstance(callback, TrainingTimePredictor):
            return callback
    return None


class _ETAMixin:
    """Adds the predictor's status to the bar's metrics (Lightning's ``get_metrics`` hook)."""

    _predictor: TrainingTimePredictor | None = None
    _predictor_searched: bool = False

    def _eta_text(self, trainer: Any) -> str | None:
        if not self._predictor_searched:
            self._predictor = find_predictor(trainer)
            self._predictor_searched = True
        if self._predictor is None:
            return None
        try:
            return self._predictor.status_text(trainer.global_step)
        except Exception:  # noqa: BLE001 - a progress bar never breaks training
            return None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._predictor = None
        self._predictor_searched = False
        super().on_train_start(trainer, pl_module)  # type: ignore[misc]

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """Lightning's metrics for the bar, plus ``ttp: converges ≈ step N · ETA … · run ends …``
        while training."""
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if trainer.training:
            text = self._eta_text(trainer)
            if text:
                items["ttp"] = text
        return items


class ETAProgressBar(_ETAMixin, *bases("callbacks.TQDMProgressBar")):  # type: ignore[misc]
    """Lightning's ``TQDMProgressBar`` plus ``ttp=converges ≈ step N · ETA m:ss · run ends m:ss``
    in the training bar's postfix.

    Accepts the same arguments as ``TQDMProgressBar`` (``refresh_rate``, ``process_position``,
    ``leave``). Works with both ``pytorch_lightning`` and ``lightning.pytorch`` Trainers.
    """


class RichETAProgressBar(_ETAMixin, *bases("callbacks.RichProgressBar")):  # type: ignore[misc]
    """Lightning's ``RichProgressBar`` plus a ``ttp: converges ≈ step N · ETA m:ss · run ends
    m:ss`` entry in the metrics column. Same arguments as ``RichProgressBar``; needs ``rich``.
    Works with both ``pytorch_lightning`` and ``lightning.pytorch`` Trainers.
    """
