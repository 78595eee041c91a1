"""Stability diagnostic of the linearised dynamics.

Around f0 the discrete dynamics are those of a quadratic with Hessian (in function space)
H/N, H = block-diag of the per-sample loss Hessians ∂²ℓ_i/∂f_i². For a quadratic, GD is
stable iff η λmax(Θ H)/N < 2; heavy ball with momentum m and dampening d iff
η (1 − d) λ < 2 (1 + m); Nesterov iff η λ < 2 (1 + m)/(1 + 2m); Adam's EMA (m = d = β1) like
heavy ball. Per step

    ρ_t = λmax( H^{1/2} (Σ_g η_{g,t} Θ_g / a_g) H^{1/2} ) / N,   a_g the group's bound (2 for GD),

computed exactly at f0 when the loss gives per-sample Hessians (cross-entropy, MSE, BCE) and
N·C ≤ 3000 ("exact at f0"); otherwise bounded by λmax(Σ_g …) · h with
h = max_i λmax(∂²ℓ_i/∂f_i²) (≤ 1/2 for cross-entropy, 2/C for MSE; "bound").

ρ_t > 1 ⇒ the linearised model diverges (and the real network is far from linear). The
"max stable lr" is the lr of the first group at which the most aggressive step reaches
ρ = 1 (all groups scaled together). This is a conservative bound for cross-entropy, whose
curvature shrinks as the softmax saturates.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from .discrete import _single_threaded
from .losses import Loss
from .optim_spec import GroupSpec, OptimizerSpec

__all__ = ["stability_bound", "lambda_max", "stability_report"]


def stability_bound(g: GroupSpec, kind: str = "sgd") -> float:
    """a_g: the largest stable η·λ for the group's update rule on a quadratic."""
    m = g.momentum
    if kind in ("adam", "adamw"):
        b = g.betas[0]
        return 2.0 * (1 + b) / (1 - b)
    if m == 0:
        return 2.0
    if g.nesterov:
        return 2.0 * (1 + m) / (1 + 2 * m)
    return 2.0 * (1 + m) / max(1e-12, 1 - g.dampening)


def lambda_max(grams, weights, n: int, c: int, hessian_sqrt: torch.Tensor | None = None) -> float:
    """λmax of Σ_g weights_g Θ_g, or of H^{1/2} (Σ_g weights_g Θ_g) H^{1/2} with ``hessian_sqrt``
    (N blocks C×C). Dense eigvalsh up to 300 rows, else ARPACK Lanczos on products with the
    Grams as they are (the scaled matrix is never formed: no (N·C)² float64 copy)."""
    grams = [torch.as_tensor(g) for g in grams]
    if hessian_sqrt is None and len({g.shape for g in grams}) == 1 and grams[0].shape[0] <= 300:
        m = sum(w * g.to(torch.float64) for w, g in zip(weights, grams, strict=True))
        return float(torch.linalg.eigvalsh(m.cpu())[-1])
    if hessian_sqrt is not None and n * c <= 300:
        m = sum(w * _scale(g, hessian_sqrt, n, c) for w, g in zip(weights, grams, strict=True))
        return float(torch.linalg.eigvalsh(m.cpu())[-1])
    device = grams[0].device
    s = None if hessian_sqrt is None else hessian_sqrt.to(device, torch.float64)
    size = n * c if s is not None or any(g.shape[0] == n * c for g in grams) else n
    width = size // n  # outputs per sample in the operator's vector: C, or 1 for trace kernels alone

    def apply(v: torch.Tensor) -> torch.Tensor:  # v (N, width) -> Σ_g w_g Θ_g v, (N, width)
        out = torch.zeros_like(v)
        for w, g in zip(weights, grams, strict=True):  # the product in the Gram's precision
            x = (v.reshape(-1) if g.shape[0] == n * width and width > 1 else v).to(g.dtype)
            out += w * (g @ x).to(torch.float64).reshape(n, width)
        return out

    # Matrix-vector products through torch (its thread setting), not numpy's BLAS pool.
    def matvec(x):
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(device).reshape(n, width)
        if s is not None:
            v = torch.einsum("iab,ib->ia", s, v)
        v = apply(v)
        if s is not None:
            v = torch.einsum("iab,ib->ia", s, v)
        return v.reshape(-1).cpu().numpy()

    op = LinearOperator((size, size), matvec=matvec, dtype=float)
    return float(eigsh(op, k=1, which="LA", return_eigenvectors=False, tol=1e-4, v0=np.ones(size))[0])


def _hessian_sqrt(loss: Loss, f0: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    h = loss.sample_hessian(f0, y)
    if h is None:
        return None
    evals, evecs = torch.linalg.eigh(h.double())
    return evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.transpose(-1, -2)


def _scale(gram: torch.Tensor, s: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """H^{1/2} Θ H^{1/2} with H^{1/2} block-diagonal (N blocks C×C); trace kernels become K ⊗ I_C."""
    g = torch.as_tensor(gram, dtype=torch.float64)
    if g.shape[0] == n and c > 1:
        g = torch.kron(g, torch.eye(c, dtype=torch.float64, device=g.device))
    g4 = g.reshape(n, c, n, c)
    s = s.to(g.device)
    return torch.einsum("iab,ibjd,jed->iaje", s, g4, s).reshape(n * c, n * c)


@_single_threaded
def stability_report(f0, targets, grams, loss: Loss, spec: OptimizerSpec, lr_schedule, *,
                     cache: dict | None = None) -> dict:
    """ρ_t per step, max stable lr, the unstable steps and a human-readable message.

    ``cache``: a dict kept with the kernel (λmax per lr direction and the loss curvature), so
    what-if simulations on the same kernel skip the eigenvalue problems.
    """
    lrs = spec.schedule(lr_schedule)
    f0 = torch.as_tensor(f0, dtype=torch.float64)
    f0 = f0[:, None] if f0.dim() == 1 else f0
    n, c = f0.shape
    y = loss.prepare_targets(torch.as_tensor(targets), c)
    cache = {} if cache is None else cache
    if "curvature" not in cache:
        cache["curvature"] = float(loss.sample_curvature(f0, y))
        cache["hessian_sqrt"] = _hessian_sqrt(loss, f0, y) if n * c <= 3000 else None
    h = cache["curvature"]
    hessian_sqrt = cache["hessian_sqrt"]
    if hessian_sqrt is not None:
        h, mode = 1.0, "exact at f0"
    else:
        mode = "bound"
    a = np.array([stability_bound(g, spec.kind) for g in spec.groups])
    plain = ("lambda",) + (1.0,) * len(grams)
    if ("plain",) + plain not in cache:
        cache[("plain",) + plain] = lambda_max(grams, [1.0] * len(grams), n, c)
    lam_plain = cache[("plain",) + plain] / n
    scaled = lrs / a[None, :]
    # Unique lr rows (schedules repeat values); ρ is homogeneous in the lrs.
    norms = scaled.max(1)
    rho = np.zeros(lrs.shape[0])
    for t in range(lrs.shape[0]):
        if norms[t] == 0:
            continue
        direction = ("lambda",) + tuple(np.round(scaled[t] / norms[t], 10))
        if direction not in cache:
            known = [k for k in cache if isinstance(k, tuple) and len(k) == len(direction)]
            if len(known) >= 32:  # many different lr ratios: reuse the nearest computed direction
                key = min(known, key=lambda d: np.abs(np.array(d[1:]) - np.array(direction[1:])).sum())
                cache[direction] = cache[key]
            else:
                cache[direction] = lambda_max(grams, list(direction[1:]), n, c, hessian_sqrt)
        rho[t] = norms[t] * cache[direction] * h / n
    peak = int(np.argmax(rho)) if rho.size else 0
    max_lr = float(lrs[peak, 0] / rho[peak]) if rho[peak] > 0 else float("inf")
    unstable = np.nonzero(rho > 1.0)[0]
    msg = None
    if unstable.size:
        msg = (f"linearisation unreliable above lr ≈ {max_lr:.3g} (first param group): "
               f"{unstable.size} of {lrs.shape[0]} steps exceed the stability limit of the linearised "
               f"dynamics at the initial outputs (peak ρ = {rho[peak]:.2f} at step {peak})")
    return {
        "lambda_max": lam_plain,
        "loss_curvature": cache["curvature"],
        "curvature_mode": mode,
        "rho_max": float(rho.max()) if rho.size else 0.0,
        "max_stable_lr": max_lr,
        "unstable_steps": int(unstable.size),
        "first_unstable_step": int(unstable[0]) if unstable.size else None,
        "message": msg,
    }
