"""From a kernel on N0 samples to the MSE loss curve on N > N0 samples (Appendix D).

1. Eigenvalues. The normalised spectrum λ̄_k of Θ/N converges as N grows and follows a
   power law. Fit λ̄_k = c k^{−s} on the N0-spectrum (least squares in log–log,
   ``scipy.stats.linregress``, over the eigenvalues above a relative floor) and predict the
   N-spectrum with the paper's slope correction

       λ̂_k = c k^{−s + α (N0/N − 1)},    k = 1..R,   R = R0 · N/N0,   α ∈ [0.1, 0.2].

2. Projections. Keep the measured p'_k for k < k0 and continue with a power law a k^{−b}
   for k ≥ k0, fixed by p̂_{k0} = p'_{k0} and Σ_k p̂_k = ‖δy‖² (normalised: the initial loss
   L_0 on the N samples, known from labels and initial predictions, or estimated by the
   subset's L_0). b is found with ``scipy.optimize.brentq``. Since p'_k is noisy, the
   anchor p'_{k0} is the geometric-window mean of p'_k over [k0/√2, k0·√2] (a choice of ours);
   b is restricted to b ≥ 0 — when even a flat tail at the anchor cannot carry the missing
   mass, the tail is flat at the level that meets the sum.

3. The loss curve is then eq. (5) on (λ̂, p̂): :func:`closed_form.mse_curve_from_spectrum`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import linregress

__all__ = ["PowerLaw", "fit_power_law", "extrapolate_spectrum", "extrapolated_mse_curve"]


@dataclass
class PowerLaw:
    """λ_k = c · k^(−s)."""

    c: float
    s: float

    def __call__(self, k: np.ndarray, extra_slope: float = 0.0) -> np.ndarray:
        return self.c * np.asarray(k, dtype=float) ** (-(self.s + extra_slope))


def fit_power_law(values, *, k_min: int = 1, k_max: int | None = None, rel_floor: float = 1e-8) -> PowerLaw:
    """Least-squares fit of log λ_k = log c − s log k over k_min ≤ k ≤ k_max (1-based)."""
    v = np.sort(np.asarray(values, dtype=float))[::-1]
    k = np.arange(1, v.size + 1)
    keep = (k >= k_min) & (v > rel_floor * v[0])
    if k_max is not None:
        keep &= k <= k_max
    if keep.sum() < 2:
        raise ValueError("need at least two positive eigenvalues to fit a power law")
    fit = linregress(np.log(k[keep]), np.log(v[keep]))
    return PowerLaw(float(np.exp(fit.intercept)), float(-fit.slope))


def extrapolate_spectrum(eigvals0, proj0, n0: int, n: int, *, alpha: float = 0.15, k0: int | None = None,
                         total: float | None = None, fit_k_max: int | None = None):
    """Predict (λ̂_k, p̂_k), k = 1..R, for N samples from the N0-subset (λ̄'_k, p̄'_k).

    Args:
        eigvals0, proj0: normalised spectrum and projections on the subset (``mse_spectrum``).
        n0, n: subset and target dataset sizes.
        alpha: slope correction of Appendix D.
        k0: index where the projection tail starts (default min(100, R0/4)).
        total: Σ p̂_k, i.e. the initial loss L_0 on N samples (default: the subset's Σ p̄').
    Returns:
        (eigvals, proj, power_law) with arrays of length R = round(R0 · N/N0).
    """
    lam0 = np.asarray(eigvals0, dtype=float)
    p0 = np.asarray(proj0, dtype=float)
    r0 = lam0.size
    r = int(round(r0 * n / n0))
    law = fit_power_law(lam0, k_max=fit_k_max)
    k = np.arange(1, r + 1)
    lam = law(k, extra_slope=-alpha * (n0 / n - 1.0))
    k0 = max(2, min(100, r0 // 4)) if k0 is None else int(k0)
    total = float(p0.sum()) if total is None else float(total)
    head = p0[: k0 - 1]
    lo, hi = max(1, int(k0 / np.sqrt(2))), min(r0, int(np.ceil(k0 * np.sqrt(2))))
    window = p0[lo - 1 : hi]
    window = window[window > 0]
    anchor = float(np.exp(np.mean(np.log(window)))) if window.size else float(p0[k0 - 1])
    rem = total - head.sum()
    kt = np.arange(k0, r + 1, dtype=float)
    if rem <= anchor or anchor <= 0:
        tail = np.zeros_like(kt)
        tail[0] = max(rem, 0.0)
        b = float("inf")
    else:
        def excess(b):
            return anchor * np.sum((kt / k0) ** (-b)) - rem

        if excess(0.0) < 0:
            # Even a flat tail at the anchor is too small: keep it flat (b = 0) at the level that
            # meets the sum (a growing tail would be unphysical).
            b = 0.0
            tail = np.full_like(kt, rem / kt.size)
        else:
            b = brentq(excess, 0.0, 60.0)
            tail = anchor * (kt / k0) ** (-b)
    proj = np.concatenate([head, tail])
    return lam, proj, law


def extrapolated_mse_curve(f0, targets, gram, lr_steps, n_total: int, *, alpha: float = 0.15,
                           k0: int | None = None, total: float | None = None, discrete: bool = False):
    """MSE-GD loss curve L_0..L_T on N = ``n_total`` samples from a kernel on N0 samples.

    ``gram`` is the effective (lr-weighted) Gram on the N0 samples and ``lr_steps`` (T,) the
    per-step effective lr it is scaled by; eq. (5) on the spectrum of
    :func:`extrapolate_spectrum`. ``total`` = L_0 on the N samples if known (default: L_0 of the
    subset).
    """
    from .closed_form import mse_curve_from_spectrum, mse_spectrum

    sp = mse_spectrum(f0, targets, gram)
    n0 = int(f0.shape[0])
    if n_total <= n0:
        return mse_curve_from_spectrum(sp.eigvals, sp.proj, lr_steps, sp.num_outputs, discrete=discrete)
    lam, proj, _ = extrapolate_spectrum(sp.eigvals, sp.proj, n0, n_total, alpha=alpha, k0=k0, total=total)
    return mse_curve_from_spectrum(lam, proj, lr_steps, sp.num_outputs, discrete=discrete)
