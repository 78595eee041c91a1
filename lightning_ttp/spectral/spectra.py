"""Normalised singular values of hidden-layer activation matrices (DAI paper, Sec. III).

For a hidden layer l with d_l units and a fixed set of m inputs, the activation matrix
A_l is m x d_l. Its singular values σ_1 >= σ_2 >= ... are divided by σ_1, so the largest
is 1 (the paper's "normalized singular values ... in descending order").

Edge cases, all without raising:

* m < d_l: A_l has at most r = min(m, d_l) non-zero singular values. We return exactly
  r values; the scores (``scores.py``) then average over r, not d_l (see there).
* dead layer (all activations zero, σ_1 = 0): the spectrum is all zeros, reported as
  ``dead=True`` by :func:`spectrum_of`.
* NaN / inf activations: rows (samples) with a non-finite entry are dropped. If fewer
  than two rows remain, the spectrum is all-NaN and the scores ignore the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Spectrum", "normalized_singular_values", "spectrum_of", "effective_rank", "global_avg_pool"]


@dataclass(frozen=True)
class Spectrum:
    """Normalised singular values of one layer at one round, plus what happened on the way.

    ``values`` is a 1-D float64 CPU tensor of length r = min(m, d_l), descending, values[0] == 1
    (all zeros for a dead layer, all NaN when nothing finite was left). ``units`` is d_l,
    ``samples`` the number of finite rows used, ``dropped`` the number of non-finite rows.
    """

    values: torch.Tensor
    units: int
    samples: int
    dropped: int = 0
    dead: bool = False

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.values).all()) and self.values.numel() > 0


def _as_matrix(activations: torch.Tensor) -> torch.Tensor:
    if activations.dim() == 1:
        return activations.unsqueeze(1)
    if activations.dim() > 2:
        return activations.reshape(activations.shape[0], -1)
    return activations


def spectrum_of(activations: torch.Tensor, dtype: torch.dtype = torch.float64) -> Spectrum:
    """Normalised singular values of an (m x d_l) activation matrix, with edge cases handled.

    Inputs with more than two dimensions are flattened per sample (use
    :func:`global_avg_pool` first for convolutional feature maps). Computation is in float64
    on the tensor's device (exact: for the m <= a few thousand, d_l <= a few thousand that
    this is used for, an exact method is fast enough; see :func:`_singular_values` and the
    overhead section of ``benchmarks/give_up.py``); the result is moved to the CPU.
    ``dtype`` is the working precision: float64 (default) agrees with ``svdvals`` to ~1e-15;
    float32 (what ``EarlyGiveUp`` and the benchmark use, ~2x faster) to ~1e-4 absolute on the
    normalised values, far below the round-to-round changes the scores measure. The returned
    values are always float64.
    """
    a = _as_matrix(activations.detach())
    m, d = int(a.shape[0]), int(a.shape[1]) if a.dim() == 2 else 1
    a = a.to(dtype)
    finite_rows = torch.isfinite(a).all(dim=1)
    dropped = int(m - finite_rows.sum())
    if dropped:
        a = a[finite_rows]
    used = int(a.shape[0])
    r = max(min(m, d), 1)
    if used < 2 or d == 0:
        return Spectrum(torch.full((r,), float("nan"), dtype=torch.float64), d, used, dropped)
    s = _singular_values(a).cpu()
    top = float(s[0]) if s.numel() else 0.0
    # keep the output length r = min(m, d) fixed even when rows were dropped
    out = torch.zeros(r, dtype=torch.float64)
    k = min(r, s.numel())
    if top <= 0.0 or not torch.isfinite(s).all():
        if not torch.isfinite(s).all():
            return Spectrum(torch.full((r,), float("nan"), dtype=torch.float64), d, used, dropped)
        return Spectrum(out, d, used, dropped, dead=True)
    out[:k] = (s[:k] / top).to(torch.float64)
    return Spectrum(out, d, used, dropped)


def _singular_values(a: torch.Tensor) -> torch.Tensor:
    """Descending singular values of a float64 matrix.

    Small matrices: ``torch.linalg.svdvals``. From 64 x 64 on: square roots of the
    eigenvalues of the smaller Gram matrix (AᵀA or AAᵀ) with ``torch.linalg.eigvalsh`` —
    about 1.7x faster on one CPU thread for 1000 x 512 and equal to ``svdvals`` to ~1e-15
    relative to σ_1 in float64 (normalised values below ~1e-7, ~1e-3 in float32, are lost to
    rounding, which does not move the scores: all of them average the σ_i).
    """
    m, d = a.shape
    if min(m, d) < 64:
        return torch.linalg.svdvals(a)
    gram = a.T @ a if m >= d else a @ a.T
    ev = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    return ev.sqrt()


def normalized_singular_values(activations: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """σ_i / σ_1 of an (m x d_l) activation matrix, descending, length min(m, d_l).

    Zeros for a dead layer, NaN when no finite sample is left; see :func:`spectrum_of`.
    """
    return spectrum_of(activations, dtype).values


def effective_rank(values: torch.Tensor, eps: float = 1e-12) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of p_i = σ_i / Σ σ_j + eps.

    Used as the label-free peer in the benchmark. NaN for a non-finite spectrum, 0 for a
    dead layer.
    """
    v = values.to(torch.float64)
    if v.numel() == 0 or not torch.isfinite(v).all():
        return float("nan")
    total = float(v.sum())
    if total <= 0:
        return 0.0
    p = v / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def global_avg_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """(m, C, H, W, ...) -> (m, C): the opt-in reduction for convolutional feature maps."""
    if feature_map.dim() <= 2:
        return feature_map
    return feature_map.flatten(2).mean(dim=2)
