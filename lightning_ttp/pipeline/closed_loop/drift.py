"""Step 2 of the closed loop: how far the kernel at step k has drifted from the fit-start kernel.

The scale s_k = Σ_g η_g tr Θ_g^{(k)} / Σ_g η_g tr Θ_g^{(0)}, the centred kernel-target alignment
A(K) = ⟨K_c, (YYᵀ)_c⟩_F / (‖K_c‖_F ‖(YYᵀ)_c‖_F) (Cortes et al. 2012) of the per-sample kernel
K = Σ_c Θ_{(i,c),(j,c)}, the growth along the loss gradient
g_k = Σ_g η_g rᵀΘ_g^{(k)} r / Σ_g η_g rᵀΘ_g^{(0)} r, r = ∂L/∂f at the outputs f_k (under gradient
flow dL/dt = −η rᵀΘr/N²: g_k is how much faster the kernel at w_k moves the loss down than the
fit-start kernel would from the same outputs; the trace counts every direction alike, g_k the
one training follows), and the extrapolated scale m(t) = ŝ(t)/ŝ(k), ŝ(t) = α + β log(1 + t).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["KernelDrift", "centred_alignment", "drift_multiplier", "growth_multiplier", "kernel_drift",
           "residual_growth"]


def _sample_kernel(gram: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample kernel K_ij = Σ_c Θ_(i,c),(j,c) (N, N) of a full (N·C)² or trace (N, N) Gram."""
    g = torch.as_tensor(gram, dtype=torch.float64)
    if g.shape[0] == n:
        return g
    c = g.shape[0] // n
    return torch.einsum("icjc->ij", g.reshape(n, c, n, c))


def _target_matrix(targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Y (N, C): one-hot for class indices, the targets themselves otherwise."""
    y = torch.as_tensor(targets)
    if y.dim() == 1 and not y.is_floating_point():
        return torch.nn.functional.one_hot(y.long(), num_outputs).to(torch.float64)
    return y.reshape(y.shape[0], -1).to(torch.float64)


def centred_alignment(kernel: torch.Tensor, targets: torch.Tensor) -> float:
    """Centred kernel-target alignment A(K, YYᵀ) ∈ [−1, 1] of an (N, N) kernel and targets Y (N, C).

    A = ⟨K_c, T_c⟩_F / (‖K_c‖_F ‖T_c‖_F), K_c = HKH, T_c = H YYᵀ H, H = I − 11ᵀ/N.
    """
    k = torch.as_tensor(kernel, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.float64).to(k.device).reshape(k.shape[0], -1)
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    yc = y - y.mean(0, keepdim=True)
    tc = yc @ yc.T
    denom = float(kc.norm() * tc.norm())
    return float((kc * tc).sum()) / denom if denom > 0 else 0.0


@dataclass
class KernelDrift:
    """How the kernel at step ``step`` differs from the fit-start kernel.

    Attributes:
        step: the optimiser step k of the current kernel.
        scale: Σ_g η_g tr Θ_g^{(k)} / Σ_g η_g tr Θ_g^{(0)} (lr-weighted trace ratio).
        alignment: centred kernel-target alignment of the current kernel.
        alignment_start: the same for the fit-start kernel.
        growth: g_k along the loss gradient (module docstring; NaN when not measured).
    """

    step: int
    scale: float
    alignment: float
    alignment_start: float
    growth: float = float("nan")


def _quadratic_form(gram: torch.Tensor, residual: torch.Tensor) -> float:
    """rᵀΘr for a full (N·C)² Gram (rows ordered sample-major, (i, c)) or Σ_c r_cᵀ K r_c for a trace (N, N) one."""
    g = torch.as_tensor(gram, dtype=torch.float64)
    r = residual.to(device=g.device, dtype=torch.float64)
    if g.shape[0] == r.shape[0]:
        return float((r * (g @ r)).sum())
    v = r.reshape(-1)
    return float(v @ (g @ v))


def residual_growth(start: Sequence[torch.Tensor], current: Sequence[torch.Tensor], residual: torch.Tensor,
                    lrs: Sequence[float] | np.ndarray) -> float:
    """g_k = Σ_g η_g rᵀΘ_g^{(k)} r / Σ_g η_g rᵀΘ_g^{(0)} r for the per-sample loss gradients
    ``residual`` r (N, C) at the current outputs (module docstring); NaN when the fit-start form vanishes."""
    r = torch.as_tensor(residual)
    forms = [sum(float(eta) * _quadratic_form(g, r) for eta, g in zip(lrs, grams, strict=True))
             for grams in (start, current)]
    return forms[1] / forms[0] if forms[0] > 0 else float("nan")


def kernel_drift(start: Sequence[torch.Tensor], current: Sequence[torch.Tensor], targets: torch.Tensor,
                 lrs: Sequence[float] | np.ndarray, *, num_outputs: int, step: int = 0,
                 residual: torch.Tensor | None = None) -> KernelDrift:
    """Drift of per-group Grams ``current`` against ``start`` (same subset, same kernel kind).

    Args:
        start, current: one Gram per param group ((N·C)² or (N, N)).
        targets: the subset's targets (class indices or (N, C) values).
        lrs: one learning rate per group (the weights η_g of the trace ratio).
        residual: the per-sample loss gradients ∂ℓ_i/∂f_i (N, C) at the current outputs, for the
            growth g_k (not measured without them).
    """
    if len(start) != len(current) or len(start) != len(lrs):
        raise ValueError(f"got {len(start)} start Grams, {len(current)} current Grams and {len(lrs)} lrs: "
                         "pass one of each per param group")
    n = int(torch.as_tensor(targets).shape[0])
    ks = [sum(float(eta) * _sample_kernel(g, n) for eta, g in zip(lrs, grams, strict=True))
          for grams in (start, current)]
    t0, t1 = float(torch.trace(ks[0])), float(torch.trace(ks[1]))
    y = _target_matrix(targets, num_outputs)
    growth = float("nan") if residual is None else residual_growth(start, current, residual, lrs)
    return KernelDrift(int(step), t1 / t0 if t0 > 0 else float("nan"), centred_alignment(ks[1], y),
                       centred_alignment(ks[0], y), growth)


def _scale_trend(history: Sequence[KernelDrift]) -> tuple[float, float]:
    """(α, β) of ŝ(t) = α + β log(1 + t) fitted to (0, 1) and the measured scales."""
    t = np.array([0.0] + [d.step for d in history])
    s = np.array([1.0] + [d.scale for d in history])
    keep = np.isfinite(s)
    t, s = t[keep], s[keep]
    if np.unique(t).size < 2:
        return float(s[-1]), 0.0
    beta, alpha = np.polyfit(np.log1p(t), s, 1)
    return float(alpha), float(beta)


def drift_multiplier(history: Sequence[KernelDrift], step: int, total_steps: int, *,
                     max_drift: float = 3.0) -> np.ndarray:
    """m(t) = ŝ(t)/ŝ(k) for t = k..T−1: the extrapolated kernel scale relative to now."""
    alpha, beta = _scale_trend(history)
    t = np.arange(step, total_steps, dtype=np.float64)
    now = alpha + beta * np.log1p(step)
    if now <= 0:
        return np.ones_like(t)
    return np.clip((alpha + beta * np.log1p(t)) / now, 1.0 / max_drift, max_drift)


def growth_multiplier(history: Sequence[KernelDrift], step: int, total_steps: int, *,
                      max_drift: float = 3.0) -> np.ndarray:
    """m(t) = ĝ(t)/g_k for t = k..T−1, ĝ continuing the growth between the last two calls on a log
    clock: ĝ(t) = g_k + β log((1 + t)/(1 + k)), β = (g_k − g_j)/log((1 + k)/(1 + j)) (the fit-start
    kernel, g_0 = 1, stands before the first call); ones when g_k is not measured."""
    points = [(0, 1.0)] + [(d.step, d.growth) for d in history if np.isfinite(d.growth) and d.step > 0]
    t = np.arange(step, total_steps, dtype=np.float64)
    (j, g_j), (k, g_k) = points[-2:] if len(points) > 1 else (points[0], points[0])
    if k != step or k == 0 or g_k <= 0:  # nothing measured at this step: the kernel held
        return np.ones_like(t)
    beta = (g_k - g_j) / np.log((1.0 + k) / (1.0 + j))
    return np.clip((g_k + beta * np.log((1.0 + t) / (1.0 + k))) / g_k, 1.0 / max_drift, max_drift)
