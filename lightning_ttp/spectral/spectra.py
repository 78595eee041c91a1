"""Normalised singular values of hidden-layer activation matrices (DAI paper, Sec. III).

For a hidden layer l with d_l units and a fixed set of m inputs, the activation matrix
A_l is m x d_l. Its singular values σ_1 >= σ_2 >= ... are divided by σ_1, so the largest
is 1 (the paper's "normalized singular values ... in descending order"). The scale that the
normalisation removes is kept next to them: ``Spectrum.scale`` is the RMS of the centred
activations ‖A_l − 1 μ_lᵀ‖_F / sqrt(m d_l) (μ_l the mean over samples: the part of the output
that depends on the input), from which the scores tell a representation that is still growing or
shrinking from one that has stopped changing (see :mod:`.scores`).

Numerics: always float64. The matrix is divided by its largest absolute entry first (the
normalised values are scale-free, and tiny activations — late learners start near 1e-3 —
then do not underflow in the Gram matrix), then: ``eigvalsh`` of the smaller Gram matrix;
if that raises or returns non-finite values, ``torch.linalg.svdvals``; if that fails too,
SciPy's ``gesvd`` driver (slower, more robust than the divide-and-conquer default).

Edge cases, all without raising:

* m < d_l: A_l has at most r = min(m, d_l) non-zero singular values. We return exactly
  r values; the scores then average over r, not d_l.
* dead layer: all activations zero, or the same output for every sample (relative spread
  across samples below 1e-6: nothing of the input gets through, e.g. behind a dead ReLU
  layer): the spectrum is all zeros, ``dead=True``, scale 0.
* NaN / inf activations: rows (samples) with a non-finite entry are dropped and counted
  (``dropped``). If fewer than two rows remain, the spectrum is all-NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CONSTANT = 1e-6  # relative spread across samples below which a layer's output is "constant"

__all__ = [
    "Spectrum", "normalized_singular_values", "spectrum_of", "layer_spectra", "effective_rank", "global_avg_pool",
]


@dataclass(frozen=True)
class Spectrum:
    """Normalised singular values of one layer at one round, plus what happened on the way.

    ``values`` is a 1-D float64 CPU tensor of length r = min(m, d_l), descending, values[0] == 1
    (all zeros for a dead layer, all NaN when nothing finite was left). ``units`` is d_l,
    ``samples`` the number of finite rows used, ``dropped`` the number of non-finite rows,
    ``scale`` the RMS of the centred finite activations (NaN when there are none).
    """

    values: torch.Tensor
    units: int
    samples: int
    dropped: int = 0
    dead: bool = False
    scale: float = float("nan")

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.values).all()) and self.values.numel() > 0


def _as_matrix(activations: torch.Tensor) -> torch.Tensor:
    if activations.dim() == 1:
        return activations.unsqueeze(1)
    if activations.dim() > 2:
        return activations.reshape(activations.shape[0], -1)
    return activations


def spectrum_of(activations: torch.Tensor) -> Spectrum:
    """Normalised singular values and RMS scale of an (m x d_l) activation matrix.

    Inputs with more than two dimensions are flattened per sample (use
    :func:`global_avg_pool` first for convolutional feature maps). Computed in float64 on the
    tensor's device; the values are returned on the CPU.
    """
    a = _as_matrix(activations.detach()).to(torch.float64)
    m, d = int(a.shape[0]), int(a.shape[1])
    finite_rows = torch.isfinite(a).all(dim=1)
    dropped = int(m - finite_rows.sum())
    if dropped:
        a = a[finite_rows]
    used = int(a.shape[0])
    r = max(min(m, d), 1)
    nan = torch.full((r,), float("nan"), dtype=torch.float64)
    if used < 2 or d == 0:
        return Spectrum(nan, d, used, dropped)
    top_entry = float(a.abs().max())
    if top_entry == 0.0:
        return Spectrum(torch.zeros(r, dtype=torch.float64), d, used, dropped, dead=True, scale=0.0)
    a = a / top_entry
    spread = float((a - a.mean(dim=0)).square().mean().sqrt())
    if spread <= _CONSTANT * float(a.square().mean().sqrt()):  # the same output for every sample
        return Spectrum(torch.zeros(r, dtype=torch.float64), d, used, dropped, dead=True, scale=0.0)
    scale = top_entry * spread
    s = _singular_values(a).cpu()
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or float(s[0]) <= 0.0:
        return Spectrum(nan, d, used, dropped, scale=scale)
    out = torch.zeros(r, dtype=torch.float64)
    k = min(r, s.numel())  # keep the length r = min(m, d) also when rows were dropped
    out[:k] = s[:k] / s[0]
    return Spectrum(out, d, used, dropped, scale=scale)


def layer_spectra(matrices: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[float], list[int]]:
    """:func:`spectrum_of` of each monitored layer's activation matrix of one round, split into
    what the scores need: the normalised singular values σ_l, the RMS scales and the units d_l
    (one entry per layer, in the order of ``matrices``)."""
    specs = [spectrum_of(m) for m in matrices]
    return [s.values for s in specs], [s.scale for s in specs], [s.units for s in specs]


def _singular_values(a: torch.Tensor) -> torch.Tensor:
    """Descending singular values of a float64 matrix whose entries are at most 1 in size.

    From 64 x 64 on: square roots of the eigenvalues of the smaller Gram matrix (AᵀA or AAᵀ,
    ``eigvalsh``), ~1.7x faster than ``svdvals`` on one CPU thread for 1000 x 512 and equal
    to it to ~1e-15 relative to σ_1 (normalised values below ~1e-7 are lost to rounding,
    which does not move the scores: all of them average the σ_i). Smaller matrices, or when
    the Gram route fails: ``svdvals``, then SciPy's ``gesvd``.
    """
    m, d = a.shape
    if min(m, d) >= 64:
        try:
            gram = a.T @ a if m >= d else a @ a.T
            ev = torch.linalg.eigvalsh(gram)
            if bool(torch.isfinite(ev).all()):
                return ev.flip(0).clamp_min(0.0).sqrt()
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            pass
    try:
        s = torch.linalg.svdvals(a)
        if bool(torch.isfinite(s).all()):
            return s
    except RuntimeError:
        pass
    import scipy.linalg

    return torch.from_numpy(
        scipy.linalg.svd(a.cpu().numpy(), compute_uv=False, lapack_driver="gesvd", check_finite=False)
    )


def normalized_singular_values(activations: torch.Tensor) -> torch.Tensor:
    """σ_i / σ_1 of an (m x d_l) activation matrix, descending, length min(m, d_l).

    Zeros for a dead layer, NaN when no finite sample is left; see :func:`spectrum_of`.
    """
    return spectrum_of(activations).values


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
    """(m, C, H, W, ...) -> (m, C): the reduction for convolutional feature maps."""
    if feature_map.dim() <= 2:
        return feature_map
    return feature_map.flatten(2).mean(dim=2)
