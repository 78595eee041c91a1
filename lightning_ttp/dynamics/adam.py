"""Adam / AdamW approximated in function space (not covered by the paper).

Adam's update  w ← w − η m̂_t / (√v̂_t + ε)  is per coordinate and not linear in the
gradients, so it has no exact function-space form. We split it into a fixed per-coordinate
part and a slowly varying per-block part (a block = one parameter tensor, or several
consecutive tensors of one param group when there are many):

1. **Preconditioned kernel at w0.** The caller estimates v_d ≈ E_B[g_{B,d}²] from
   mini-batch gradients at w0 and computes, per block k,
   K_k = J_k diag(1/(√v_d + ε)) J_kᵀ (the NTK of the reparametrised model
   w = w0 + diag((√v + ε)^{-1/2}) z, so the kernel engine computes it). For full-batch GD the
   first step is then exact: K r = J (g/|g|) = J sign(g).
2. **Drift of the second moment.** As training proceeds the gradients shrink and Adam's
   steps grow relative to the gradient. We track, per block and path, the bias-corrected
   EMA_β2 of q_k = rᵀ K_k r (= Σ_d g_d²/(√v_d+ε), exact in function space) and assume
   √v̂_d(t) = √v_d · ρ_k(t) with ρ_k(t)² = EMA(q_k)(t)/q_k(0) (uniform shrinking inside a
   block). The block's update is multiplied by (a_k + ε)/(a_k ρ_k(t) + ε), a_k = mean_d √v_d.
3. **First moment** exactly: J_k m_k = EMA_β1(K_k r)-image, bias corrected.

    f ← f − Σ_k η_{g(k)} (a_k + ε)/(a_k ρ_k + ε) · EMA_β1(K_k r)/(1 − β1^t)   [− η λ (J w0 + u), AdamW]

What is lost: the per-coordinate evolution of v inside a block (only its block-average
drift is followed), the mini-batch-to-batch fluctuation of v, and AMSGrad. The benchmark
measures the resulting error (docs/prediction.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .discrete import SimulationResult, _check_schedule, _single_threaded, apply_kernel, kernel_kind
from .losses import Loss
from .optim_spec import OptimizerSpec

__all__ = ["simulate_adam"]


@_single_threaded
def simulate_adam(
    f0: torch.Tensor,
    targets: torch.Tensor,
    block_grams: Sequence[torch.Tensor],
    block_group: Sequence[int],
    block_sizes: Sequence[int],
    block_rms: Sequence[float],
    loss: Loss,
    spec: OptimizerSpec,
    lr_schedule: np.ndarray,
    *,
    jvp_w0: Sequence[torch.Tensor] | None = None,
    weights: Callable[[int], torch.Tensor] | None = None,
    num_paths: int = 1,
) -> SimulationResult:
    """Adam(W) on the linearised model with per-block adaptive scales (see module docstring)."""
    lrs = _check_schedule(lr_schedule, spec)
    steps = lrs.shape[0]
    dtype = torch.float64
    f0 = torch.as_tensor(f0).to(dtype)
    f0 = f0[:, None] if f0.dim() == 1 else f0
    n, c = f0.shape
    y = loss.prepare_targets(torch.as_tensor(targets), c)
    grams = [torch.as_tensor(g).to(dtype) for g in block_grams]
    kinds = [kernel_kind(g, n, c) for g in grams]
    wd = spec.has_weight_decay
    jw = None
    if wd:
        jw = ([torch.zeros(n, c, dtype=dtype) for _ in spec.groups] if jvp_w0 is None
              else [torch.as_tensor(j).to(dtype).reshape(n, c) for j in jvp_w0])
        u = [torch.zeros(num_paths, n, c, dtype=dtype) for _ in spec.groups]
    f = f0.expand(num_paths, n, c).clone()
    m = [torch.zeros(num_paths, n, c, dtype=dtype) for _ in grams]
    v = [torch.zeros(num_paths, dtype=dtype) for _ in grams]
    q0: list[torch.Tensor | None] = [None] * len(grams)
    losses = np.empty((num_paths, steps + 1))
    errs = None
    for t in range(steps + 1):
        losses[:, t] = loss.value(f, y).numpy()
        e = loss.error(f, y)
        if e is not None:
            errs = np.empty((num_paths, steps + 1)) if errs is None else errs
            errs[:, t] = e.numpy()
        if t == steps:
            break
        w = torch.full((num_paths, n), 1.0 / n, dtype=dtype) if weights is None else weights(t).to(dtype)
        r = w[..., None] * loss.per_sample_grad(f, y)
        delta = torch.zeros_like(f)
        step_no = t + 1
        group_delta = [torch.zeros_like(f) for _ in spec.groups] if wd else None
        for k, gram in enumerate(grams):
            gi = block_group[k]
            gs = spec.groups[gi]
            b1, b2 = gs.betas
            d = apply_kernel(gram, r, kinds[k])
            q = (d * r).flatten(1).sum(1).clamp_min(0.0)  # rᵀ K_k r = Σ_d g_d²/(√v_d + ε)
            if q0[k] is None:
                q0[k] = torch.where(q > 0, q, torch.ones_like(q))
            v[k] = b2 * v[k] + (1 - b2) * q
            m[k] = b1 * m[k] + (1 - b1) * d
            rho = (v[k] / (1 - b2**step_no) / q0[k]).sqrt()
            a = block_rms[k]
            scale = (a + gs.eps) / (a * rho + gs.eps)
            upd = -lrs[t, gi] * scale[:, None, None] * m[k] / (1 - b1**step_no)
            delta = delta + upd
            if wd:
                group_delta[gi] = group_delta[gi] + upd
        if wd:
            for gi, gs in enumerate(spec.groups):
                if gs.weight_decay:
                    decay = -lrs[t, gi] * gs.weight_decay * (jw[gi] + u[gi])
                    delta = delta + decay
                    group_delta[gi] = group_delta[gi] + decay
                u[gi] = u[gi] + group_delta[gi]
        f = f + delta
    return SimulationResult(losses, errs, f, None)
