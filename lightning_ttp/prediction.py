"""The result of a training-time prediction: curves, band, convergence times, diagnostics.

The ε-training-time is the paper's "normalised threshold" (Section 5, Algorithm 1):

    T_ε = min { t : |L_s − L_T| ≤ ε (L_0 − L_T) for all s ≥ t }

the first step after which the curve stays within ε of its total decrease from the final
value L_T (T = the planned number of steps). Real curves are measured the same way after
the documented smoothing of :func:`lightning_ttp.dynamics.training_time.smooth_curve`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dynamics.training_time import (
    _check_eps,
    epsilon_training_time,
    first_step_at_or_above,
    first_step_at_or_below,
)

__all__ = ["Prediction"]


def _array(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


def _band(b) -> tuple[np.ndarray, np.ndarray] | None:
    return None if b is None else (np.asarray(b[0], dtype=np.float64), np.asarray(b[1], dtype=np.float64))


@dataclass
class Prediction:
    """Predicted training curves over optimiser steps 0..T.

    Attributes:
        steps: ``np.arange(T + 1)`` (optimiser steps, as Lightning's ``global_step``).
        loss: expected training loss on the training set (mean over samples, as the user's loss
            reports it) after each step; ``loss[0]`` is the loss at the initial weights.
        loss_band: (low, high) 5–95 % band over Monte Carlo / SDE paths, ``None`` if deterministic.
        error: expected training error (1 − accuracy) per step, ``None`` for regression.
        error_band: (low, high) band of the error, or ``None``.
        diagnostics: kernel size, λmax, max stable lr, seconds spent, method, warnings, ...
    """

    steps: np.ndarray
    loss: np.ndarray
    loss_band: tuple[np.ndarray, np.ndarray] | None = None
    error: np.ndarray | None = None
    error_band: tuple[np.ndarray, np.ndarray] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.steps = np.asarray(self.steps, dtype=np.int64)
        self.loss = np.asarray(self.loss, dtype=np.float64)
        self.loss_band = _band(self.loss_band)
        self.error = _array(self.error)
        self.error_band = _band(self.error_band)
        if self.loss.ndim != 1 or self.loss.shape != self.steps.shape:
            raise ValueError(f"loss {self.loss.shape} and steps {self.steps.shape} must be 1-D of equal length")

    @property
    def num_steps(self) -> int:
        """T, the number of simulated optimiser steps."""
        return int(self.steps[-1]) if self.steps.size else 0

    @property
    def method(self) -> str | None:
        return self.diagnostics.get("method")

    def training_time(self, eps: float, *, curve: str = "loss") -> int | None:
        """ε-training-time in steps (``eps`` relative, in (0, 1)) of the predicted loss or error.

        ``None`` if the curve never converges (it did not decrease, or diverged).
        """
        _check_eps(eps)
        values = self.loss if curve == "loss" else self._error_curve()
        return epsilon_training_time(values, eps)

    def steps_to_loss(self, value: float) -> int | None:
        """First step whose predicted loss is ≤ ``value``; ``None`` if not reached within T."""
        return first_step_at_or_below(self.loss, value)

    def steps_to_accuracy(self, value: float) -> int | None:
        """First step whose predicted training accuracy (1 − error) is ≥ ``value`` (in [0, 1])."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {value}")
        return first_step_at_or_above(1.0 - self._error_curve(), value)

    def _error_curve(self) -> np.ndarray:
        if self.error is None:
            raise ValueError("this prediction has no error curve (regression loss); use the loss")
        return self.error

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-able) dict; :meth:`from_dict` restores it exactly."""

        def lst(a):
            return None if a is None else a.tolist()

        return {
            "steps": self.steps.tolist(),
            "loss": lst(self.loss),
            "loss_band": None if self.loss_band is None else [lst(self.loss_band[0]), lst(self.loss_band[1])],
            "error": lst(self.error),
            "error_band": None if self.error_band is None else [lst(self.error_band[0]), lst(self.error_band[1])],
            "diagnostics": copy.deepcopy(self.diagnostics),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        return cls(
            steps=data["steps"],
            loss=data["loss"],
            loss_band=data.get("loss_band"),
            error=data.get("error"),
            error_band=data.get("error_band"),
            diagnostics=copy.deepcopy(data.get("diagnostics", {})),
        )

    def __repr__(self) -> str:
        tail = "" if self.error is None else f", error {self.error[0]:.3f}→{self.error[-1]:.3f}"
        return (f"Prediction(T={self.num_steps}, loss {self.loss[0]:.4g}→{self.loss[-1]:.4g}{tail}, "
                f"method={self.method})")
