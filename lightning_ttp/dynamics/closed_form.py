"""MSE gradient descent in closed form (eq. 4–5, Proposition 2).

With PyTorch's ``mse_loss`` (mean over the N·C entries) the gradient flow of the linearised
model is linear: δ_t := f_t − y obeys dδ/dt = −(2 η̃_t/(N C)) Θ δ. With the eigen-decomposition
Θ/N = Σ_k λ̄_k v_k v_kᵀ (normalised by N so the spectrum converges as N grows, Appendix D)
and p̄_k = (v_k · δ_0)² / (N C) (so Σ_k p̄_k = L_0):

    L_t = Σ_k p̄_k exp(−(4/C) λ̄_k S_t),     S_t = Σ_{s<t} η̃_s                      (eq. 5)

which is the paper's L_t = Σ_k e^{−2ηλ_k t} (δy·v_k)² up to the loss normalisation. The
discrete GD map gives instead L_t = Σ_k p̄_k Π_{s<t} (1 − 2 η_s λ̄_k / C)² (``discrete=True``,
exact step by step for plain GD). For a trace kernel (Θ ⊗ I_C) the projections are summed
over the C output columns. Per-group lrs must share the schedule shape (η_{g,t} = s_t η_{g,0}).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .discrete import SimulationResult, _single_threaded, kernel_kind
from .losses import MSE
from .optim_spec import OptimizerSpec

__all__ = ["MSESpectrum", "mse_spectrum", "mse_curve_from_spectrum", "simulate_mse_closed_form"]


@dataclass
class MSESpectrum:
    """Normalised eigenvalues λ̄_k of Θ_eff/N (descending), projections p̄_k, and vectors."""

    eigvals: np.ndarray
    proj: np.ndarray
    num_outputs: int
    vectors: np.ndarray | None = None
    coeffs: np.ndarray | None = None  # V^T δ0, (K,) or (K, C) for a trace kernel


def _proportional(lrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split lrs (T, G) into s_t (T,) and a reference row (G,) with lrs = s_t · row."""
    ref = lrs[int(np.argmax(lrs.sum(1)))]
    if not np.any(ref):
        return np.zeros(lrs.shape[0]), np.ones(lrs.shape[1])
    j = int(np.argmax(ref))
    s = lrs[:, j] / ref[j]
    if not np.allclose(lrs, s[:, None] * ref[None, :], rtol=1e-9, atol=1e-15):
        raise ValueError("the MSE closed form needs all param groups to follow the same schedule shape; "
                         "use method='ode' or 'discrete'")
    return s, ref


def mse_spectrum(f0, targets, gram) -> MSESpectrum:
    """Eigen-decomposition of Θ/N and the normalised projections of δ0 = f0 − y (on the CPU in
    float64, wherever the Gram lives: the results are numpy arrays)."""
    f0 = torch.as_tensor(f0).detach().to("cpu", torch.float64)
    f0 = f0[:, None] if f0.dim() == 1 else f0
    n, c = f0.shape
    y = MSE().prepare_targets(torch.as_tensor(targets).cpu(), c).to(torch.float64)
    gram = torch.as_tensor(gram).detach().to("cpu", torch.float64)
    kind = kernel_kind(gram, n, c)
    evals, evecs = torch.linalg.eigh(gram / n)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    delta = (f0 - y)
    if kind == "full":
        coeffs = evecs.T @ delta.reshape(-1)
        proj = coeffs**2 / (n * c)
    else:
        coeffs = evecs.T @ delta
        proj = (coeffs**2).sum(1) / (n * c)
    return MSESpectrum(evals.numpy(), proj.numpy(), c, evecs.numpy(), coeffs.numpy())


def mse_curve_from_spectrum(eigvals, proj, lr_steps, num_outputs: int, *, discrete: bool = False) -> np.ndarray:
    """L_0..L_T from (λ̄_k, p̄_k) and the per-step effective lrs (T,) (eq. 5)."""
    lam = np.asarray(eigvals, dtype=float)[None, :]
    lr = np.asarray(lr_steps, dtype=float)
    if discrete:
        factors = (1.0 - 2.0 * lr[:, None] * lam / num_outputs) ** 2
        decay = np.vstack([np.ones_like(lam), np.cumprod(factors, axis=0)])
    else:
        cum = np.concatenate([[0.0], np.cumsum(lr)])[:, None]
        decay = np.exp(-4.0 / num_outputs * lam * cum)
    return decay @ np.asarray(proj, dtype=float)


@_single_threaded
def simulate_mse_closed_form(f0, targets, grams, spec: OptimizerSpec, lr_schedule, *, discrete: bool = False,
                             use_elr: bool = True) -> SimulationResult:
    """Eq. (4)–(5) on Θ_eff = Σ_g (η̃_g/η̃_ref) Θ_g; returns loss and (one-hot targets) error."""
    if spec.has_weight_decay:
        raise ValueError("the MSE closed form has no weight decay; use method='discrete' or 'ode'")
    if discrete and spec.has_momentum:
        raise ValueError("the discrete closed form is for plain GD; use method='discrete' with momentum")
    lrs = spec.schedule(lr_schedule)
    factors = np.array([g.effective_lr_factor(spec.kind) if use_elr else 1.0 for g in spec.groups])
    s, ref = _proportional(lrs * factors[None, :])
    j = int(np.argmax(ref))
    theta = sum(torch.as_tensor(g).detach().to("cpu", torch.float64) * (ref[i] / ref[j]) for i, g in enumerate(grams))
    spec_ = mse_spectrum(f0, targets, theta)
    lr_steps = s * ref[j]
    loss = mse_curve_from_spectrum(spec_.eigvals, spec_.proj, lr_steps, spec_.num_outputs, discrete=discrete)
    # Outputs at every step for the error curve: δ_t = V diag(decay) Vᵀ δ0.
    lam = spec_.eigvals[None, :]
    c = spec_.num_outputs
    if discrete:
        amp = np.vstack([np.ones_like(lam), np.cumprod(1.0 - 2.0 * lr_steps[:, None] * lam / c, axis=0)])
    else:
        amp = np.exp(-2.0 / c * lam * np.concatenate([[0.0], np.cumsum(lr_steps)])[:, None])
    f0t = torch.as_tensor(f0).detach().to("cpu", torch.float64)
    f0t = f0t[:, None] if f0t.dim() == 1 else f0t
    n = f0t.shape[0]
    y = MSE().prepare_targets(torch.as_tensor(targets).cpu(), c).to(torch.float64)
    v = spec_.vectors
    if spec_.coeffs.ndim == 1:
        deltas = (amp * spec_.coeffs[None, :]) @ v.T  # (T+1, N·C)
        deltas = deltas.reshape(-1, n, c)
    else:
        deltas = np.einsum("tk,kc,nk->tnc", amp, spec_.coeffs, v)
    fs = torch.from_numpy(deltas) + y
    err = MSE().error(fs, y)
    return SimulationResult(loss[None], None if err is None else err.numpy()[None], fs[-1][None], None)
