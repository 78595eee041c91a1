"""The result of a training-time prediction: curves, band, convergence times, diagnostics.

The ε-training-time is the paper's "normalised threshold" (Section 5, Algorithm 1):

    T_ε = min { t : |L_s − L_T| ≤ ε (L_0 − L_T) for all s ≥ t }

the first step after which the curve stays within ε of its total decrease from the final
value L_T (T = the planned number of steps). Real curves are measured the same way after
the documented smoothing of :func:`lightning_ttp.dynamics.training_time.smooth_curve`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..dynamics.training_time import (
    _check_eps,
    epsilon_training_time,
    first_step_at_or_above,
    first_step_at_or_below,
    still_falling,
)

__all__ = ["Diagnostics", "Prediction", "plain_python"]


def _array(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


def _band(b) -> tuple[np.ndarray, np.ndarray] | None:
    return None if b is None else (np.asarray(b[0], dtype=np.float64), np.asarray(b[1], dtype=np.float64))


def plain_python(x: Any) -> Any:
    """Mappings, sequences, numpy scalars/arrays as plain JSON-able Python (str keys, lists);
    what checkpoints loaded with ``weights_only=True`` accept."""
    if isinstance(x, Mapping):
        return {str(k): plain_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_python(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


@dataclass
class Diagnostics:
    """How a prediction was made and how far to trust it.

    Read as attributes or, for convenience, like a mapping (``pred.diagnostics["max_stable_lr"]``).

    Attributes:
        method: the simulator that ran ("discrete", "mc", "ode", "sde", "closed_form").
        optimizer, optimizer_kind: the optimiser's class name and kind ("sgd", "adam", "adamw").
        kernel: "full" or "trace"; kernel_samples: N0; num_outputs: C.
        dataset_size, batch_size, full_batch, steps_per_epoch, num_paths, seed: the simulated run.
        lambda_max, loss_curvature, max_stable_lr, rho_max, unstable_steps, first_unstable_step:
            the linear stability diagnostic over the run's T steps
            (:func:`lightning_ttp.dynamics.stability_report`).
        simulated_steps: steps simulated (> T when a continuation was simulated).
        kernel_seconds, simulation_seconds, seconds: wall-clock costs.
        loss: the loss's description; lr_first, lr_last: the first and last lrs per group.
        warnings: what the simulation assumed or found, as sentences.
        extra: anything else (parameter counts, projection dimension, the run's plan).
    """

    method: str | None = None
    optimizer: str | None = None
    optimizer_kind: str | None = None
    kernel: str | None = None
    kernel_samples: int | None = None
    num_outputs: int | None = None
    dataset_size: int | None = None
    batch_size: int | None = None
    full_batch: bool | None = None
    steps_per_epoch: int | None = None
    num_paths: int | None = None
    seed: int | None = None
    lambda_max: float | None = None
    loss_curvature: float | None = None
    max_stable_lr: float | None = None
    rho_max: float | None = None
    unstable_steps: int | None = None
    first_unstable_step: int | None = None
    simulated_steps: int | None = None
    kernel_seconds: float | None = None
    simulation_seconds: float | None = None
    seconds: float | None = None
    loss: str | None = None
    lr_first: list[float] | None = None
    lr_last: list[float] | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key in self._names():
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return key in self._names() or key in self.extra

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"extra"}

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-able); :meth:`from_dict` inverts it."""
        out = {name: getattr(self, name) for name in self._names()}
        out["extra"] = self.extra
        return plain_python(copy.deepcopy(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Diagnostics:
        data = copy.deepcopy(dict(data or {}))
        extra = dict(data.pop("extra", None) or {})
        known = cls._names()
        extra.update({k: v for k, v in data.items() if k not in known})
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)


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
        diagnostics: :class:`Diagnostics` (kernel size, λmax, max stable lr, costs, method, warnings).
        continuation: the same simulation's expected loss after the run, at steps T+1..H (the
            lr held at its last value), or ``None``; it answers "when would it converge" for a
            run that is still falling at T (:meth:`training_time_beyond`).
        continuation_band: its (low, high) band, or ``None``.
    """

    steps: np.ndarray
    loss: np.ndarray
    loss_band: tuple[np.ndarray, np.ndarray] | None = None
    error: np.ndarray | None = None
    error_band: tuple[np.ndarray, np.ndarray] | None = None
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    continuation: np.ndarray | None = None
    continuation_band: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.steps = np.asarray(self.steps, dtype=np.int64)
        self.loss = np.asarray(self.loss, dtype=np.float64)
        self.loss_band = _band(self.loss_band)
        self.error = _array(self.error)
        self.error_band = _band(self.error_band)
        self.continuation = _array(self.continuation)
        self.continuation_band = _band(self.continuation_band)
        if not isinstance(self.diagnostics, Diagnostics):
            self.diagnostics = Diagnostics.from_dict(self.diagnostics)
        if self.loss.ndim != 1 or self.loss.shape != self.steps.shape:
            raise ValueError(f"loss {self.loss.shape} and steps {self.steps.shape} must be 1-D of equal length")

    @property
    def num_steps(self) -> int:
        """T, the number of simulated optimiser steps."""
        return int(self.steps[-1]) if self.steps.size else 0

    @property
    def method(self) -> str | None:
        return self.diagnostics.method

    def training_time(self, eps: float, *, curve: str = "loss") -> int | None:
        """ε-training-time in steps (``eps`` relative, in (0, 1)) of the predicted loss or error.

        Measured on the run's own curve 0..T, as the real run's will be. ``None`` if the curve
        never converges (it did not decrease, or diverged). See :meth:`converged_within_run`
        and :meth:`training_time_beyond` for a curve that is still falling at T.
        """
        _check_eps(eps)
        values = self.loss if curve == "loss" else self._error_curve()
        return epsilon_training_time(values, eps)

    @property
    def diverged(self) -> bool:
        """Whether the simulated run diverges at this lr: its loss (steps 0..T) turns non-finite or
        grows ``simulate.DIVERGENCE_FACTOR``-fold above its start (the diagnostics' warnings say so,
        with ``max_stable_lr``)."""
        return bool(self.diagnostics.get("diverged", False)) or not bool(np.all(np.isfinite(self.loss)))

    def extended_loss(self) -> np.ndarray:
        """The expected loss at steps 0..H: the run's curve followed by its continuation."""
        if self.continuation is None:
            return self.loss.copy()
        return np.concatenate([self.loss, self.continuation])

    def extended_band(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The band of :meth:`extended_loss` (``None`` for a deterministic prediction)."""
        if self.loss_band is None:
            return None
        if self.continuation_band is None:
            return self.loss_band
        return (np.concatenate([self.loss_band[0], self.continuation_band[0]]),
                np.concatenate([self.loss_band[1], self.continuation_band[1]]))

    def converged_within_run(self, eps: float) -> bool:
        """``False`` when the predicted loss is still falling at T (it drops by more than ε of its
        total decrease over the last 10 % of the run: :func:`~lightning_ttp.dynamics.still_falling`);
        its ε-training-time is then ≈ T and :meth:`training_time_beyond` gives the estimate."""
        return not still_falling(self.loss, eps)

    def training_time_beyond(self, eps: float) -> int | None:
        """ε-training-time of the extended curve 0..H (may exceed T): when a run that is still
        falling at T would converge if it went on at its last lr. ``None`` without a continuation
        or if the extended curve does not converge."""
        _check_eps(eps)
        if self.continuation is None:
            return None
        return epsilon_training_time(self.extended_loss(), eps)

    def steps_to_loss(self, value: float) -> int | None:
        """First step whose predicted loss is ≤ ``value``; ``None`` if not reached within T."""
        return first_step_at_or_below(self.loss, value)

    def steps_to_accuracy(self, value: float) -> int | None:
        """First step whose predicted training accuracy (1 − error) is ≥ ``value`` (in [0, 1])."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {value}")
        return first_step_at_or_above(1.0 - self._error_curve(), value)

    def truncated(self, steps: int) -> Prediction:
        """The first ``steps`` optimiser steps (0..steps) of this prediction; the rest of the
        simulated curve becomes the continuation."""
        if not 0 < steps <= self.num_steps:
            raise ValueError(f"steps must be in 1..{self.num_steps}, got {steps}")
        keep, rest = slice(0, steps + 1), slice(steps + 1, None)
        extended, band = self.extended_loss(), self.extended_band()
        return Prediction(
            self.steps[keep], self.loss[keep],
            None if self.loss_band is None else (self.loss_band[0][keep], self.loss_band[1][keep]),
            None if self.error is None else self.error[keep],
            None if self.error_band is None else (self.error_band[0][keep], self.error_band[1][keep]),
            copy.deepcopy(self.diagnostics),
            extended[rest], None if band is None else (band[0][rest], band[1][rest]),
        )

    def rejoined(self, loss: np.ndarray) -> Prediction:
        """This prediction with its loss curve replaced by ``loss`` (steps 0..T): the band keeps its
        width relative to the curve (scaled by loss/self.loss step by step) and the continuation
        joins the new curve at T (scaled by loss[T]/self.loss[T]); the error curve is kept."""
        loss = np.asarray(loss, dtype=np.float64)
        if loss.shape != self.loss.shape:
            raise ValueError(f"loss must have the shape of this prediction's {self.loss.shape}, got {loss.shape}")
        ratio = np.where(self.loss > 0, loss / np.where(self.loss > 0, self.loss, 1.0), 1.0)
        end = float(ratio[-1])
        return Prediction(
            self.steps.copy(), loss,
            None if self.loss_band is None else (self.loss_band[0] * ratio, self.loss_band[1] * ratio),
            None if self.error is None else self.error.copy(),
            None if self.error_band is None else (self.error_band[0].copy(), self.error_band[1].copy()),
            copy.deepcopy(self.diagnostics),
            None if self.continuation is None else self.continuation * end,
            None if self.continuation_band is None else (self.continuation_band[0] * end,
                                                         self.continuation_band[1] * end))

    def _error_curve(self) -> np.ndarray:
        if self.error is None:
            raise ValueError("this prediction has no error curve (regression loss); use the loss")
        return self.error

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-able) dict; :meth:`from_dict` restores it exactly."""

        def lst(a):
            return None if a is None else a.tolist()

        def band(b):
            return None if b is None else [lst(b[0]), lst(b[1])]

        return {
            "steps": self.steps.tolist(),
            "loss": lst(self.loss),
            "loss_band": band(self.loss_band),
            "error": lst(self.error),
            "error_band": band(self.error_band),
            "diagnostics": self.diagnostics.to_dict(),
            "continuation": lst(self.continuation),
            "continuation_band": band(self.continuation_band),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        return cls(
            steps=data["steps"],
            loss=data["loss"],
            loss_band=data.get("loss_band"),
            error=data.get("error"),
            error_band=data.get("error_band"),
            diagnostics=Diagnostics.from_dict(data.get("diagnostics")),
            continuation=data.get("continuation"),
            continuation_band=data.get("continuation_band"),
        )

    def __repr__(self) -> str:
        tail = "" if self.error is None else f", error {self.error[0]:.3f}→{self.error[-1]:.3f}"
        return (f"Prediction(T={self.num_steps}, loss {self.loss[0]:.4g}→{self.loss[-1]:.4g}{tail}, "
                f"method={self.method})")
