"""Steps 5–7 of the closed loop: the continuation joined to the observed losses, calibrated, blended.

The join at the observed level ℓ_k (:func:`_level`), the speed warp a fitted to the losses
observed since the previous call (:func:`_speed`), and the weights of the blend with the power
law fitted to the observed prefix (:func:`power_law_curve`, :func:`_blend_weight`).
"""

from __future__ import annotations

import numpy as np

from ..refine import refine_curve
from .live import LivePrediction

__all__ = ["power_law_curve"]


def _level(observed: np.ndarray, step: int, window: int) -> float:
    """ℓ_k: a straight line through the last max(2·window, 3) observed losses, evaluated at k."""
    t = np.arange(observed.size, dtype=np.float64)
    keep = np.isfinite(observed)
    t, y = t[keep][-max(2 * window, 3):], observed[keep][-max(2 * window, 3):]
    if y.size == 0:
        raise ValueError("no finite observed loss to join the re-linearised prediction to")
    if y.size < 2:
        return float(y[-1])
    slope, intercept = np.polyfit(t, y, 1)
    level = float(intercept + slope * step)
    return level if level > 0 else float(y.min())


def _speed(previous: np.ndarray, since: int, observed: np.ndarray, prior: float) -> float:
    """Time warp a of the real run against a previous prediction ``previous`` (steps 0..T) over the
    losses observed since step ``since`` (MAP fit, log a ~ N(0, prior²), evidence gate 1; 1 without
    evidence of a difference)."""
    seen = observed[since:]
    if np.isfinite(seen).sum() < 3:
        return 1.0
    return refine_curve(np.asarray(previous)[since:], seen, warp_prior=prior, gate=1.0).warp


def _power(t, a, b, c):
    return a + b * (t + 1.0) ** (-c)


def power_law_curve(observed: np.ndarray, length: int) -> np.ndarray:
    """L(t) = a + b (t+1)^{−c} least-squares fitted to the finite observed losses (a, b ≥ 0,
    0 ≤ c ≤ 10; ``scipy.optimize.curve_fit``), at t = 0..length−1; the mean of the last
    observed losses where the fit fails."""
    import warnings

    from scipy.optimize import curve_fit

    t = np.arange(observed.size, dtype=np.float64)
    keep = np.isfinite(observed)
    t, y = t[keep], observed[keep]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = curve_fit(_power, t, y, p0=(0.5 * y.min(), y[0], 0.5),
                             bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 10.0]), maxfev=5000)
        return _power(np.arange(length, dtype=np.float64), *p)
    except (RuntimeError, ValueError):
        return np.full(length, float(y[-5:].mean()))


def _blend_weight(previous: LivePrediction, smoothed: np.ndarray, *, min_span: float) -> float:
    """w of the re-linearised curve: inverse mean squared log errors of the previous call's
    re-linearised and power-law curves on the smoothed losses observed since its step
    (1 when fewer than ``min_span`` steps were observed since)."""
    since, now = previous.step, smoothed.size
    if now - since < max(int(min_span), 3):  # floored: calls at rounded steps 10 % of T apart qualify
        return 1.0
    seen = np.log(np.maximum(smoothed[since:now], 1e-12))
    errors = [float(np.mean((np.log(np.maximum(np.asarray(previous.info[key])[since:now], 1e-12)) - seen) ** 2))
              for key in ("relinearised_loss", "power_law_loss")]
    if not all(np.isfinite(errors)):
        return 1.0
    inverse = [1.0 / max(e, 1e-12) for e in errors]
    return inverse[0] / (inverse[0] + inverse[1])
