"""Closed-loop refinement of a predicted loss curve from the losses observed so far.

The open-loop prediction (linearised dynamics on the empirical NTK at the pre-trained
weights) gets the *shape* of a fine-tuning loss curve right but is often off by a
speed factor: the real network's kernel drifts a little, the loss curvature differs from
the linearised one, an Adam preconditioner is approximated, ... Once real losses arrive,
we correct for that with three numbers fitted to the observed prefix:

.. math::

    r(t) = y_0 - s\\,\\bigl(P(0) - P(a\\,t)\\bigr)

where ``P`` is the predicted (expected) loss curve, linearly interpolated between steps
and held at its last value beyond the predicted horizon, ``a`` is a *time warp* (``a > 1``:
training runs faster than predicted), ``s`` scales the predicted loss *decrease* and
``y_0`` is the loss level at step 0. The ε-training-time of the paper is invariant to
``s`` and ``y_0`` — only the warp ``a`` moves it — while absolute targets
(:meth:`Refinement.steps_to_loss`) use all three.

The fit is a maximum a-posteriori estimate (``scipy.optimize.least_squares``): Gaussian
observation noise with a robust scale estimated from the observations themselves
(mini-batch losses are noisy, full-batch losses are not), and log-normal priors centred
on the open-loop prediction (``a = s = 1``), so that with few or noisy observations the
refinement stays close to the prediction and with many it follows the data.

This module is pure numpy/scipy: no Lightning, no models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dynamics.training_time import epsilon_training_time, first_step_at_or_below, smooth_curve

__all__ = [
    "Refinement",
    "epsilon_training_time",
    "refine_curve",
    "smooth_losses",
]


def smooth_losses(losses: Sequence[float] | np.ndarray, window: int, degree: int = 1) -> np.ndarray:
    """The package's one smoothing of real (noisy) loss curves before measuring their
    ε-training-time: :func:`lightning_ttp.dynamics.training_time.smooth_curve` (local linear fit
    over a centred window of odd width: the moving average inside, a line fitted to the first /
    last window at the ends; ``degree=0``: their means)."""
    return smooth_curve(losses, window, degree)


def default_smoothing_window(steps_per_epoch: int | None, full_batch: bool) -> int:
    """The smoothing width used for real curves: 1 for full-batch GD (no noise), else the
    number of optimiser steps per epoch, made odd (the engine's recommendation)."""
    if full_batch or not steps_per_epoch:
        return 1
    return max(1, int(steps_per_epoch) | 1)


@dataclass
class Refinement:
    """A predicted loss curve corrected by the observed prefix of the real one.

    Attributes:
        warp: time warp ``a`` (``> 1``: the real run is faster than predicted).
        scale: scale ``s`` of the predicted loss decrease.
        offset: fitted loss at step 0, ``y_0``.
        steps: ``0..T``.
        loss: the refined expected loss per step.
        loss_band: ``(low, high)`` refined band (the predicted band, mapped the same way).
        num_observed: how many observed losses were used.
        noise: the estimated standard deviation of an observed loss.
    """

    warp: float
    scale: float
    offset: float
    steps: np.ndarray
    loss: np.ndarray
    loss_band: tuple[np.ndarray, np.ndarray] | None
    num_observed: int
    noise: float
    extra: dict[str, Any] = field(default_factory=dict)

    def training_time(self, eps: float) -> int | None:
        """ε-training-time (steps) of the refined curve (:func:`epsilon_training_time`, the
        engine's definition; None if the refined curve does not decrease)."""
        return epsilon_training_time(self.loss, eps)

    def steps_to_loss(self, value: float) -> int | None:
        """First step at which the refined loss is ``<= value`` (None if not within the run)."""
        return first_step_at_or_below(self.loss, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python representation (for checkpoints); :meth:`from_dict` inverts it."""
        return {
            "warp": self.warp,
            "scale": self.scale,
            "offset": self.offset,
            "steps": self.steps.tolist(),
            "loss": self.loss.tolist(),
            "loss_band": None if self.loss_band is None else [b.tolist() for b in self.loss_band],
            "num_observed": self.num_observed,
            "noise": self.noise,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Refinement:
        band = data.get("loss_band")
        return cls(
            warp=float(data["warp"]),
            scale=float(data["scale"]),
            offset=float(data["offset"]),
            steps=np.asarray(data["steps"], dtype=np.int64),
            loss=np.asarray(data["loss"], dtype=np.float64),
            loss_band=None if band is None else (np.asarray(band[0]), np.asarray(band[1])),
            num_observed=int(data["num_observed"]),
            noise=float(data["noise"]),
            extra=dict(data.get("extra", {})),
        )


def _noise_scale(observed: np.ndarray, floor: float) -> float:
    """Robust standard deviation of the observation noise: MAD of first differences / √2."""
    if observed.size < 3:
        return floor
    diffs = np.diff(observed)
    # first differences of a smooth curve are ~constant locally: remove the trend by
    # differencing twice (the noise of second differences has variance 6σ²)
    second = np.diff(diffs)
    mad = float(np.median(np.abs(second - np.median(second))))
    return max(1.4826 * mad / np.sqrt(6.0), floor)


def refine_curve(
    predicted: Sequence[float] | np.ndarray,
    observed: Sequence[float] | np.ndarray,
    *,
    band: tuple[np.ndarray, np.ndarray] | None = None,
    observed_steps: Sequence[int] | np.ndarray | None = None,
    warp_prior: float = 0.3,
    scale_prior: float = 0.2,
    offset_prior: float = 0.1,
    gate: float = 2.0,
    noise: float | None = None,
    warp_bounds: tuple[float, float] = (0.1, 10.0),
    horizon: int | None = None,
    start: Refinement | None = None,
) -> Refinement:
    """Fit time warp, decrease scale and level of ``predicted`` to the observed losses.

    Args:
        predicted: expected loss at steps ``0..T`` from the open-loop prediction.
        observed: real training losses (mean over each optimiser step's batch) at
            ``observed_steps`` (default ``0..len(observed)-1``). Non-finite values are dropped.
        band: optional ``(low, high)`` predicted band, mapped like the curve.
        warp_prior: standard deviation of ``log a`` under the prior (larger: trust data more).
        scale_prior: standard deviation of ``log s`` under the prior.
        offset_prior: standard deviation of ``y_0 - P(0)`` under the prior, relative to the
            predicted decrease ``|P(0) - P(T)|`` (the prediction knows the loss at step 0).
        gate: evidence gate on the warp: the fitted ``log a`` is multiplied by
            ``z²/(z² + gate²)`` where ``z`` is its posterior z-score, so a warp the data do not
            clearly support stays near 1 (0 disables the gate).
        noise: standard deviation of one observed loss; estimated from the data if None.
        warp_bounds: allowed range of the warp ``a``.
        start: a previous refinement of the same prediction: its fit is the starting point
            (one local optimisation instead of three; used by the callback's periodic refits).
        horizon: the run's last step T (default ``len(predicted) - 1``). Pass a prediction
            simulated *beyond* the run (e.g. to 2T) and ``horizon=T``: a run that is faster
            than predicted (``a > 1``) then follows the predicted curve past T instead of
            holding its last value.

    Returns:
        A :class:`Refinement` over the same steps ``0..T``. With no observations it is the
        prediction itself (``a = s = 1``).
    """
    from scipy.optimize import least_squares

    pred = np.asarray(predicted, dtype=np.float64)
    if pred.ndim != 1 or pred.size < 2:
        raise ValueError(f"predicted must be a 1-D curve over steps 0..T (T >= 1), got shape {pred.shape}.")
    if not np.all(np.isfinite(pred)):
        raise ValueError("predicted contains non-finite values; there is nothing to refine.")
    obs = np.asarray(observed, dtype=np.float64).reshape(-1)
    t_obs = (
        np.arange(obs.size, dtype=np.float64)
        if observed_steps is None
        else np.asarray(observed_steps, dtype=np.float64).reshape(-1)
    )
    if t_obs.shape != obs.shape:
        raise ValueError(f"observed_steps has {t_obs.size} entries but observed has {obs.size}.")
    keep = np.isfinite(obs)
    obs, t_obs = obs[keep], t_obs[keep]
    grid = np.arange(pred.size, dtype=np.float64)
    last = pred.size - 1 if horizon is None else int(horizon)
    if not 1 <= last <= pred.size - 1:
        raise ValueError(f"horizon must be in [1, {pred.size - 1}] (the predicted steps), got {horizon}.")
    steps = np.arange(last + 1)

    def curve_at(source: np.ndarray, times: np.ndarray) -> np.ndarray:
        return np.interp(times, grid, source)  # held at its last value beyond the horizon

    decrease_scale = max(abs(pred[0] - pred[last]), 1e-12)
    if obs.size == 0:
        run_band = None if band is None else (np.asarray(band[0])[: last + 1], np.asarray(band[1])[: last + 1])
        return Refinement(1.0, 1.0, float(pred[0]), steps, pred[: last + 1].copy(), run_band, 0, float("nan"))

    sigma = float(noise) if noise is not None else _noise_scale(obs, 1e-3 * decrease_scale)
    # the predicted band says how far a single real run may stray from the expected curve by
    # chance (mini-batch order): that spread is model uncertainty, not evidence of a warp
    spread = np.zeros_like(t_obs)
    if band is not None:
        low, high = (np.asarray(b, dtype=np.float64) for b in band)
        if low.shape == pred.shape and high.shape == pred.shape:
            spread = curve_at((high - low) / (2 * 1.645), t_obs)  # 5-95 % band -> one sd
    scale_t = np.sqrt(sigma**2 + spread**2)
    p0 = pred[0]
    offset_sd = offset_prior * decrease_scale

    def model(theta: np.ndarray, times: np.ndarray, source: np.ndarray = pred) -> np.ndarray:
        log_a, log_s, delta = theta
        return p0 + delta - np.exp(log_s) * (source[0] - curve_at(source, np.exp(log_a) * times))

    def residuals(theta: np.ndarray) -> np.ndarray:
        data = (model(theta, t_obs) - obs) / scale_t
        prior = np.array([theta[0] / warp_prior, theta[1] / scale_prior, theta[2] / offset_sd])
        return np.concatenate([data, prior])

    lo, hi = np.log(warp_bounds[0]), np.log(warp_bounds[1])
    bounds = ([lo, np.log(0.05), -np.inf], [hi, np.log(20.0), np.inf])
    best = None
    # the warp makes the objective piecewise-linear in log a: try a few starts (or continue
    # from the previous fit)
    starts = [np.array([0.0, 0.0, 0.0]), np.array([-0.5, 0.0, 0.0]), np.array([0.5, 0.0, 0.0])]
    if start is not None and start.extra.get("theta") is not None:
        starts = [np.clip(np.asarray(start.extra["theta"], dtype=np.float64), bounds[0], bounds[1])]
    for x0 in starts:
        fit = least_squares(residuals, x0, bounds=bounds, method="trf", x_scale=[0.3, 0.3, offset_sd])
        if best is None or fit.cost < best.cost:
            best = fit
    assert best is not None
    theta = best.x.copy()
    run_grid = steps.astype(np.float64)
    # evidence gate: with few or noisy observations the MAP warp still wanders within its
    # posterior uncertainty; shrink it towards the prediction unless it is significant
    # (weight z²/(z² + gate²), z = log a / posterior sd of log a from the Gauss-Newton Hessian)
    z = np.inf
    try:
        cov = np.linalg.pinv(best.jac.T @ best.jac)
        sd = float(np.sqrt(max(cov[0, 0], 1e-300)))
        z = abs(theta[0]) / sd
    except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - degenerate Jacobian
        pass
    if gate > 0 and np.isfinite(z):
        theta[0] *= z**2 / (z**2 + gate**2)
    refined = model(theta, run_grid)
    refined_band = None
    if band is not None:
        low, high = (np.asarray(b, dtype=np.float64)[: last + 1] for b in band)
        # the band keeps its offsets from the expected curve
        refined_band = (refined - (pred[: last + 1] - low), refined + (high - pred[: last + 1]))
    return Refinement(
        warp=float(np.exp(theta[0])),
        scale=float(np.exp(theta[1])),
        offset=float(theta[2]),
        steps=steps,
        loss=refined,
        loss_band=refined_band,
        num_observed=int(obs.size),
        noise=sigma,
        extra={"warp_z": float(z) if np.isfinite(z) else None, "theta": [float(v) for v in best.x]},
    )
