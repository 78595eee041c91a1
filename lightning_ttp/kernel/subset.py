"""A kernel on N0 of N training samples, made to stand for all N: each sample's own term reweighted.

Training on N samples moves a subset sample's output f_i by the mean over the batch of
Θ_ij g_j. Simulated on the N0 kernel samples with weights 1/N0 (mini-batches drawn from the
subset, or its full batch), the terms j ≠ i estimate the whole set's Σ_j Θ_ij g_j / N without
bias (the N0 − 1 others stand for the N − 1 others), but a sample's own term Θ_ii g_i / N0 comes
N/N0 times too often: the subset memorises its own samples N/N0 times faster than the data set
does, and the predicted run is too fast (on the random tanh MLP of ``benchmarks/subset_bias.py``,
N/N0 = 4–16, the ε = 0.4 training time by 45–85 %).

Only the part of Θ_ii that the other samples do not share is over-weighted. Write the kernel as
Θ = S + D, S the part shared between samples (what a sample's gradient does to the others'
outputs) and D ⪰ 0 block diagonal (each sample's idiosyncratic "nugget"); the whole set's
dynamics restricted to the subset are then those of

    Θ̂ = S + (N0/N)·D = Θ − (1 − N0/N)·D.

D is not observed. Scaling every self block (D = diag blocks of Θ, the mean-field choice) takes
the shared part's diagonal too: on a fine-tuning kernel, where samples share most of their
kernel, Θ̂ turns indefinite and the prediction breaks (the digits fine-tune of
``benchmarks/subset_bias.py``: median ε-time error 47.6 % against 7.9 % uncorrected; the
directions clipped to zero never train). We take the largest multiple of the self blocks that is
certainly idiosyncratic,

    D = α·B,   B = blockdiag(Θ_ii),   α = λ_min(B^{-1/2} Θ B^{-1/2}) ∈ [0, 1],

because Θ − α·B ⪰ 0 (α is the largest such multiple): Θ̂ ⪰ (N0/N)·α·B ⪰ 0 always, no direction
grows or freezes. For a kernel "low rank + isotropic nugget" (random features on nearly
orthogonal inputs) α recovers the nugget's share exactly; for samples that share their kernel
(a pre-trained backbone) α ≈ 0 and the kernel is left as it is. α is a lower bound of the
idiosyncratic share, so the correction never overshoots: it removes part of the bias, never
adds any. The trace kernel (Θ ≈ K ⊗ I_C) uses the same formula with 1 × 1 blocks.

Pure torch.
"""

from __future__ import annotations

import torch

__all__ = ["NEGLIGIBLE_SHARE", "idiosyncratic_share", "stand_for_dataset"]

#: α below which the kernel is left as it is (the correction would move the self terms by < 1 %).
NEGLIGIBLE_SHARE = 0.01
#: rows of the principal sub-block whose λ_min screens out a negligible α before the full eigvalsh.
SCREEN_ROWS = 256


def _self_blocks(gram: torch.Tensor, n0: int) -> torch.Tensor:
    """(N0, C, C): each sample's own block of a sample-major (N0·C)² Gram."""
    c = gram.shape[0] // n0
    idx = torch.arange(n0, device=gram.device)
    return gram.reshape(n0, c, n0, c)[idx, :, idx, :]


def idiosyncratic_share(gram: torch.Tensor, n0: int) -> float:
    """α = λ_min(B^{-1/2} Θ B^{-1/2}) clipped to [0, 1] (module docstring), computed in float64;
    0 when below :data:`NEGLIGIBLE_SHARE`.

    A sample whose self block is singular (an output no parameter moves) contributes a zero
    pseudo-inverse block: its rows and columns of the normalised kernel are zero and ignored."""
    g = torch.as_tensor(gram).to(torch.float64)
    if g.shape[0] % n0:
        raise ValueError(f"a Gram of {g.shape[0]} rows is not sample-major over {n0} samples")
    values, vectors = torch.linalg.eigh(_self_blocks(g, n0))
    floor = values.amax(dim=-1, keepdim=True).clamp(min=0.0) * 1e-10
    keep = values > floor
    inv_sqrt = torch.where(keep, values.clamp(min=torch.finfo(g.dtype).tiny).rsqrt(), torch.zeros_like(values))
    whiten = (vectors * inv_sqrt[:, None, :]) @ vectors.transpose(1, 2)  # (N0, C, C) = B_i^{-1/2}
    c = g.shape[0] // n0
    blocks = g.reshape(n0, c, n0, c)
    normalised = torch.einsum("iab,ibjc,jdc->iajd", whiten, blocks, whiten).reshape(n0 * c, n0 * c)
    live = normalised[keep.reshape(-1)][:, keep.reshape(-1)]
    if not live.numel():
        return 0.0
    # Cauchy interlacing: a principal sub-block's λ_min bounds the whole's from above, so a
    # shared kernel (the fine-tuning case, α ≈ 0) is recognised for the cost of a small block
    head = live[:SCREEN_ROWS, :SCREEN_ROWS]
    if head.shape[0] < live.shape[0] and float(torch.linalg.eigvalsh(head)[0]) < NEGLIGIBLE_SHARE:
        return 0.0
    share = float(torch.linalg.eigvalsh(live)[0].clamp(0.0, 1.0))
    return share if share >= NEGLIGIBLE_SHARE else 0.0


def stand_for_dataset(gram: torch.Tensor, n0: int, dataset_size: int) -> tuple[torch.Tensor, float]:
    """Θ̂ = Θ − (1 − N0/N)·α·blockdiag(Θ_ii) (module docstring) and the α used.

    Returns the Gram unchanged (α = 0) when the subset is the whole set. The result has the input's
    dtype and device."""
    if dataset_size <= n0:
        return gram, 0.0
    share = idiosyncratic_share(gram, n0)
    if share <= 0.0:
        return gram, 0.0
    out = gram.clone()
    c = gram.shape[0] // n0
    idx = torch.arange(n0, device=gram.device)
    view = out.view(n0, c, n0, c)
    view[idx, :, idx, :] = view[idx, :, idx, :] * (1.0 - (1.0 - n0 / dataset_size) * share)
    return out, share
