"""ε-training-time and threshold times on loss / error curves.

Definition (the paper's Section 5 / Algorithm 1): for a curve L_0..L_T,

    T_ε = min { t : |L_s − L_T| ≤ ε (L_0 − L_T)  for every s ≥ t }

i.e. the first step after which the curve *stays* within ε of its total decrease from its
final value. Conventions: a constant curve has T_ε = 0; a curve that did not decrease
(L_T ≥ L_0 while not constant) or contains non-finite values never converged → ``None``.

Real curves are smoothed the same way every time before measuring: a local linear fit over
a centred window of odd width ``window`` (``scipy.signal.savgol_filter`` of order 1): inside
the curve that is the centred moving average; within half a window of either end it is the
line fitted to the first (last) ``window`` values, so a falling curve's L_0 and L_T are not
pulled towards the interior as a moving average with padded edges pulls them (which shrinks
L_0 − L_T and delays T_ε). ``window=1`` means no smoothing. The benchmarks score mini-batch
runs against the loss on the whole training set at every step (no smoothing needed); for
mini-batch losses we recommend ``window`` ≈ steps per epoch (odd). Smoothing cannot remove
all of the batch noise: when what is left exceeds ε·(L_0 − L_T), a small ε's T_ε of a smoothed
mini-batch curve measures the noise, not the convergence.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import savgol_filter

__all__ = [
    "epsilon_training_time",
    "first_step_at_or_above",
    "first_step_at_or_below",
    "smooth_curve",
    "still_falling",
]


def smooth_curve(values, window: int = 1, degree: int = 1) -> np.ndarray:
    """Local linear smoothing over a centred window of odd width ``window`` (an even one is
    widened by one; one longer than the curve shrinks to the curve's largest odd length):
    the centred moving average inside, the line fitted to the first / last ``window`` values
    within half a window of the ends (module docstring). A straight line is left unchanged; a
    curve with non-finite values (a diverged run) is returned as it is (it never converged).
    ``degree=0``: a constant fitted at the ends instead of a line (the mean of the first / last
    window: half the noise of a line's end, for values with no trend of their own, such as a
    curve's difference from its expected shape)."""
    if degree not in (0, 1):
        raise ValueError(f"degree must be 0 (local constant) or 1 (local line), got {degree}")
    v = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    window = window | 1
    window = min(window, v.size if v.size % 2 == 1 else v.size - 1)
    if window < 3 or not np.all(np.isfinite(v)):
        return v.copy()
    return savgol_filter(v, window, degree, mode="interp")


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be a relative tolerance in (0, 1) (e.g. 0.1 for 10 %), got {eps}")
    return eps


def epsilon_training_time(curve, eps: float, *, window: int = 1) -> int | None:
    """T_ε of ``curve`` (after optional smoothing); ``None`` if the curve never converged."""
    eps = _check_eps(eps)
    c = smooth_curve(curve, window)
    if c.size == 0:
        raise ValueError("empty curve")
    if not np.all(np.isfinite(c)):
        return None
    final = c[-1]
    dev = np.abs(c - final)
    drop = c[0] - final
    scale = max(1.0, abs(final), abs(c[0]))
    if drop <= 1e-12 * scale:
        return 0 if dev.max() <= 1e-12 * scale else None
    bad = np.nonzero(dev > eps * drop)[0]
    return 0 if bad.size == 0 else int(bad[-1] + 1)


def first_step_at_or_below(curve, value: float) -> int | None:
    """First t with curve[t] ≤ value, ``None`` if never within the curve."""
    c = np.asarray(curve, dtype=float)
    hit = np.nonzero(c <= value)[0]
    return int(hit[0]) if hit.size else None


def first_step_at_or_above(curve, value: float) -> int | None:
    """First t with curve[t] ≥ value, ``None`` if never within the curve."""
    c = np.asarray(curve, dtype=float)
    hit = np.nonzero(c >= value)[0]
    return int(hit[0]) if hit.size else None



def still_falling(curve, eps: float, *, tail: float = 0.1) -> bool:
    """Whether ``curve`` is still falling at its end: over its last ``tail`` fraction of steps it
    drops by more than ε of its total decrease L_0 − L_T. Its ε-training-time is then ≈ T and
    says nothing ("not converged within the run")."""
    eps = _check_eps(eps)
    c = np.asarray(curve, dtype=float)
    if c.size < 3 or not np.all(np.isfinite(c)):
        return False
    drop = c[0] - c[-1]
    if drop <= 0:
        return False
    start = max(0, min(c.size - 2, int(round((1.0 - tail) * (c.size - 1)))))
    return bool(c[start] - c[-1] > eps * drop)
