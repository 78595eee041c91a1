"""Adam / AdamW approximated in function space (not covered by the paper).

Adam's update  w ← w − η m̂_t / (√v̂_t + ε)  is per coordinate and not linear in the
gradients, so it has no exact function-space form. We split it into a fixed per-coordinate
part and a slowly varying per-block part (a block = consecutive parameter tensors of one param
group; the caller chooses them, ``estimate_kernel`` uses one block per param group):

1. **Preconditioned kernel at w0.** The caller estimates v_d ≈ E_B[g_{B,d}²] from
   mini-batch gradients at w0 and computes, per block k,
   K_k = J_k diag(1/(√v_d + ε)) J_kᵀ (the NTK of the reparametrised model
   w = w0 + diag((√v + ε)^{-1/2}) z, so the kernel engine computes it). For full-batch GD the
   first step is then exact: K r = J g/(|g| + ε).
2. **Drift of the second moment.** As training proceeds the gradients shrink and Adam's
   steps grow relative to the gradient. We track, per block and path, the bias-corrected
   EMA_β2 of q_k = rᵀ K_k r (= Σ_d g_d²/(√v_d+ε), exact in function space) and assume
   √v̂_d(t) = √v_d · ρ_k(t) with ρ_k(t)² = EMA(q_k)(t)/q_k(0) (uniform shrinking inside a
   block). The block's update is multiplied by (a_k + ε)/(a_k ρ_k(t) + ε), a_k = mean_d √v_d.
3. **First moment** exactly: J_k m_k = EMA_β1(K_k r)-image, bias corrected.

    f ← f − Σ_k η_{g(k)} (a_k + ε)/(a_k ρ_k + ε) · EMA_β1(K_k r)/(1 − β1^t)   [− η λ (J w0 + u), AdamW]

The drift is tracked from each Monte-Carlo path's own simulated batch gradients. What is
lost: the per-coordinate evolution of v inside a block (only its block-average drift is
followed), Adam's per-coordinate sign-like saturation, and AMSGrad. ``benchmarks/
prediction_cost.py`` measures the resulting error against real AdamW runs (docs/prediction.md).

Cost: per step one product of the batch's rows of the K Grams side by side with the batch
gradients of all P paths (``discrete.product``); with one block, what an SGD simulation costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .batch import Batch
from .discrete import CurveRecorder, SimulationResult, _single_threaded, as_gram, kernel_kind, product
from .losses import Loss
from .optim_spec import OptimizerSpec

__all__ = ["apply_blocks", "simulate_adam", "stack_blocks"]


def stack_blocks(block_grams: Sequence[torch.Tensor], n: int, c: int) -> tuple[torch.Tensor, str]:
    """The K block Grams side by side, so that one product gives every K_k r.

    Full kernels: (N·C, K·N·C), ``r (P, N·C) @ stacked`` = [K_1 r, …, K_K r]; trace kernels:
    (N, K·N) with r's C columns as the batch. Precision: float64 if every block is float64,
    else float32 (:func:`~lightning_ttp.dynamics.discrete.as_gram`).
    """
    grams = [as_gram(g) for g in block_grams]
    kinds = {kernel_kind(g, n, c) for g in grams}
    if len(kinds) != 1:
        raise ValueError("the block Grams mix full (N·C)² and trace N² kernels: estimate them together")
    dtype = torch.float64 if all(g.dtype == torch.float64 for g in grams) else torch.float32
    return torch.cat([g.to(dtype) for g in grams], dim=1), kinds.pop()


def apply_blocks(stacked: torch.Tensor, r: torch.Tensor, kind: str, k: int, batch: Batch | None = None
                 ) -> torch.Tensor:
    """[K_1 r, …, K_K r] as (P, K, N, C), in the Grams' precision, returned in r's.

    ``r``: (P, N, C), or with a sparse ``batch`` the batch gradient's rows (P, |B|, C).
    """
    p, c = r.shape[0], r.shape[-1]
    out = product(stacked, r, kind, batch)
    if kind == "full":
        out = out.reshape(p, k, -1, c)
    else:
        out = out.reshape(p, c, k, -1).permute(0, 2, 3, 1)
    return out.to(r.dtype)


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
    batches: Callable[[int], Batch] | None = None,
    num_paths: int = 1,
    settle_after: int | None = None,
) -> SimulationResult:
    """Adam(W) on the linearised model with per-block adaptive scales (see module docstring).

    Every step is one product of the batch gradients of all P paths with the K block Grams
    side by side (:func:`stack_blocks`); the moments of all blocks and paths are updated as
    (P, K) and (P, K, N, C) tensors. Runs on the Grams' device, products in their precision,
    state in float64.

    Args:
        block_grams: K preconditioned block Grams K_k (N·C)² or (N, N).
        block_group: the param group of each block; ``block_sizes`` its parameter count (kept
            for the caller's diagnostics); ``block_rms`` a_k = mean_d √v_d over the block.
        batches, num_paths: ``batches(t) -> Batch`` for the P paths (default the full batch) and P.
        settle_after: stop a continuation past step T once the loss settled (``discrete.CurveRecorder``).
    """
    lrs = spec.schedule(lr_schedule)
    steps = lrs.shape[0]
    k = len(block_grams)
    if not (len(block_group) == len(block_sizes) == len(block_rms) == k):
        raise ValueError("block_grams, block_group, block_sizes and block_rms must have one entry per block")
    dtype = torch.float64
    f0 = torch.as_tensor(f0).to(dtype)
    f0 = f0[:, None] if f0.dim() == 1 else f0
    n, c = f0.shape
    stacked, kind = stack_blocks(block_grams, n, c)
    device = stacked.device
    f0 = f0.to(device)
    y = loss.prepare_targets(torch.as_tensor(targets), c).to(device)
    groups = spec.groups

    def per_block(values) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    b1 = per_block([groups[g].betas[0] for g in block_group])
    b2 = per_block([groups[g].betas[1] for g in block_group])
    eps = per_block([groups[g].eps for g in block_group])
    rms = per_block(block_rms)
    block_lrs = torch.as_tensor(lrs[:, list(block_group)], dtype=dtype, device=device)  # (T, K)
    wd = spec.has_weight_decay
    if wd:
        # which group each block belongs to, to sum the block updates into the groups' u_g
        member = torch.zeros(k, len(groups), dtype=dtype, device=device)
        member[torch.arange(k), torch.as_tensor(list(block_group))] = 1.0
        jw = (torch.zeros(len(groups), n, c, dtype=dtype, device=device) if jvp_w0 is None
              else torch.stack([torch.as_tensor(j).to(device, dtype).reshape(n, c) for j in jvp_w0]))
        decay = per_block([g.weight_decay for g in groups])  # λ_g
        group_lrs = torch.as_tensor(lrs, dtype=dtype, device=device)  # (T, G)
        u = torch.zeros(num_paths, len(groups), n, c, dtype=dtype, device=device)
    f = f0.expand(num_paths, n, c).clone()
    m = torch.zeros(num_paths, k, n, c, dtype=dtype, device=device)
    v = torch.zeros(num_paths, k, dtype=dtype, device=device)
    q0 = None
    full_batch = Batch(torch.full((num_paths, n), 1.0 / n, dtype=dtype, device=device))
    curves = CurveRecorder(loss, y, num_paths, steps, device, settle_after)
    for t in range(steps):
        batch = full_batch if batches is None else batches(t).to(device)
        value, r = loss.value_and_batch_gradient(f, y, batch)  # r: (P, N, C), or the batch's rows (P, |B|, C)
        curves.record(t, f, value)
        if curves.settled(t):
            break
        d = apply_blocks(stacked, r, kind, k, batch)  # (P, K, N, C): K_k r
        d_rows = d if batch.index is None else torch.gather(
            d, 2, batch.index[:, None, :, None].expand(-1, k, -1, c))  # (P, K, |B|, C): the batch's rows
        q = (d_rows * r[:, None]).sum((2, 3)).clamp_min(0.0)  # rᵀ K_k r = Σ_d g_d²/(√v_d + ε)
        if q0 is None:
            q0 = torch.where(q > 0, q, torch.ones_like(q))
        step_no = t + 1
        v = b2 * v + (1 - b2) * q
        m = b1[:, None, None] * m + (1 - b1)[:, None, None] * d
        rho = (v / (1 - b2**step_no) / q0).sqrt()
        scale = (rms + eps) / (rms * rho + eps)
        coef = -block_lrs[t] * scale / (1 - b1**step_no)  # (P, K)
        upd = coef[..., None, None] * m
        if wd:
            moved = torch.einsum("pknc,kg->pgnc", upd, member)
            moved = moved - (group_lrs[t] * decay)[:, None, None] * (jw + u)
            u = u + moved
            f = f + moved.sum(1)
        else:
            f = f + upd.sum(1)
    else:
        curves.record(steps, f)
    return curves.result(f)
