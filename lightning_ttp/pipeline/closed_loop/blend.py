"""Steps 5–7 of the closed loop: the continuation joined to the observed losses, calibrated, blended.

The observed prefix smoothed as its difference from the curve expected before the call
(:func:`_smoothed_prefix`), the speed warp a of the previous call's curve fitted to the losses
observed since (:func:`_speed`; the first call: a = 1), the join at the observed level ℓ_k (that
warped curve moved to the mean of those losses, :func:`_level_along`; the first call: a line
through the last losses' difference from the expected curve, :func:`_level`), and the weights of
the blend with the power law fitted to the observed prefix (:func:`power_law_curve`,
:func:`_blend_weight`).
"""

from __future__ import annotations

import numpy as np

from ..refine import refine_curve, smooth_losses
from .live import LivePrediction

__all__ = ["power_law_curve"]


def _expected(reference: np.ndarray | None, size: int) -> np.ndarray | None:
    """The first ``size`` steps of the expected curve; None without one, or where it is not finite
    there (a simulated curve that diverged: the losses are then smoothed themselves)."""
    if reference is None:
        return None
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.size < size:
        raise ValueError(f"the reference curve must cover steps 0..{size - 1}, got {ref.size} steps")
    return ref[:size] if np.isfinite(ref[:size]).all() else None


def _smoothed_prefix(observed: np.ndarray, window: int, reference: np.ndarray | None) -> np.ndarray:
    """The observed losses (finite) smoothed as their difference from the expected curve ``reference``
    (steps 0..): ref + smooth₀(observed − ref), a moving average with the mean of the first / last
    window at the ends. A local linear fit of the losses themselves cuts the corner of the steep
    first steps (over one epoch's batches it put L_0 at 1.75 where the run started at 2.17, and
    every ε-band is measured from L_0); the difference keeps the expected curvature, and with it
    a constant at the ends has half the noise of a line's end. Without a (finite) reference the
    losses themselves are smoothed (:func:`~lightning_ttp.pipeline.refine.smooth_losses`)."""
    ref = _expected(reference, observed.size)
    if ref is None:
        return smooth_losses(observed, window)
    return ref + smooth_losses(observed - ref, window, degree=0)


def _level(observed: np.ndarray, step: int, window: int, reference: np.ndarray | None = None) -> float:
    """ℓ_k: a straight line through the last max(2·window, 3) observed losses' difference from the
    expected curve ``reference`` (the losses themselves without one), evaluated at k, plus the
    expected curve there."""
    ref = _expected(reference, step + 1)
    if ref is None:
        ref = np.zeros(step + 1)
    t = np.arange(observed.size, dtype=np.float64)
    keep = np.isfinite(observed)
    t, y = t[keep][-max(2 * window, 3):], (observed - ref[: observed.size])[keep][-max(2 * window, 3):]
    if y.size == 0:
        raise ValueError("no finite observed loss to join the re-linearised prediction to")
    if y.size < 2:
        level = float(y[-1] + ref[step])
    else:
        slope, intercept = np.polyfit(t, y, 1)
        level = float(intercept + slope * step + ref[step])
    return level if level > 0 else float(observed[keep].min())


def _speed(previous: np.ndarray, since: int, observed: np.ndarray, prior: float) -> float | None:
    """Time warp a of the real run against a previous prediction ``previous`` (steps 0..T) over the
    losses observed since step ``since`` (MAP fit, log a ~ N(0, prior²), evidence gate 1; 1 without
    evidence of a difference); None with fewer than 3 finite losses since."""
    seen = observed[since:]
    if np.isfinite(seen).sum() < 3:
        return None
    return refine_curve(np.asarray(previous)[since:], seen, warp_prior=prior, gate=1.0).warp


def _level_along(previous: np.ndarray, since: int, observed: np.ndarray, warp: float) -> float:
    """ℓ_k from the previous prediction ``previous`` (steps 0..T), warped by ``warp`` from its call
    at ``since`` on, moved by the mean of the losses observed since minus the curve there: one
    parameter fitted to all k − since losses (noise σ/√(k − since); a line's end point has about
    twice that from the same losses)."""
    segment = np.asarray(previous, dtype=np.float64)[since:]
    tau = np.arange(segment.size, dtype=np.float64)
    shape = np.interp(warp * tau, tau, segment)
    seen = np.asarray(observed, dtype=np.float64)[since:]
    keep = np.isfinite(seen)
    level = float(shape[seen.size] + np.mean(seen[keep] - shape[: seen.size][keep]))
    return level if level > 0 else float(seen[keep].min())


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
