"""The result of one re-linearisation of the closed loop: :class:`LivePrediction`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...dynamics.training_time import epsilon_training_time
from .drift import KernelDrift

__all__ = ["LivePrediction"]


@dataclass
class LivePrediction:
    """The run's loss curve re-predicted at step k: observed prefix + re-linearised continuation.

    Attributes:
        step: k, the optimiser step at which the model was re-linearised.
        loss: predicted loss at steps 0..T (smoothed observed losses before k, the joined
            continuation from k on).
        continuation: the simulated loss on the kernel subset at steps k..T (before the join).
        level: ℓ_k, the observed loss level at k the continuation is joined to.
        drift: the kernel drift at k.
        multiplier: m(t), the extrapolated kernel scale applied to the lrs at steps k..T−1.
        seconds: wall time of this call; ``kernel_seconds`` the part spent in the kernel.
        info: smoothing width, Monte Carlo paths, Adam's step, the speed warp a and the
            stability measure ρ_max of the remaining steps before the cap.
    """

    step: int
    loss: np.ndarray
    continuation: np.ndarray
    level: float
    drift: KernelDrift
    multiplier: np.ndarray
    seconds: float
    kernel_seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Predicted loss at the last step T."""
        return float(self.loss[-1])

    def training_time(self, eps: float) -> int | None:
        """ε-training-time (steps) of the predicted curve (the package's definition)."""
        return epsilon_training_time(self.loss, eps)
