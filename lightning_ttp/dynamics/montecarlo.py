"""Mini-batch SGD by Monte Carlo in function space.

Each step draws a batch the way a ``DataLoader`` does and applies the batch gradient to
*all* N outputs through the kernel (``discrete.simulate_discrete`` with batches):

    f_{t+1} = f_t − Θ_η (w_t ⊙ G(f_t)),   w_{t,i} = 1/|B_t| for i ∈ B_t, 0 otherwise

(plus the exact momentum / weight-decay terms). Batches are drawn **without replacement
within an epoch** (a fresh permutation every epoch, as ``shuffle=True``), consecutive
chunks of ``batch_size``; the last short batch is dropped when ``drop_last`` is set,
otherwise it is a smaller batch (mean over its own size). Several seeded paths
(``numpy.random.default_rng([seed, path])``) give the expected curve (mean over paths)
and a band (5–95 % quantiles by default).

A batch is kept as its sample indices and weights (:class:`~lightning_ttp.dynamics.batch.Batch`),
so a step reads only the |B| columns of Θ it needs: |B|·C·N·C multiply-adds per path
instead of (N·C)².

**Kernel on a subset (N0 < N).** When the kernel was computed on N0 of the N training
samples, a batch of |B| samples drawn without replacement from N has the gradient noise

    Cov = Σ/|B| · κ,   κ = (N − |B|)/(N − 1)

(Σ the per-sample gradient covariance). We draw the batch **with replacement** from the N0
kernel samples, with |B'| draws and weight 1/|B'| per draw, |B'| ≈ |B|/κ: the batch gradient
is unbiased (E[w_t] = 1/N0: the mean over the subset estimates the mean over N) and its
covariance is Σ0/|B'|. |B'| is ⌊|B|/κ⌋ or ⌈|B|/κ⌉, chosen at random so that E[1/|B'|] = κ/|B|
exactly: the covariance is κ Σ0/|B|, Σ0 (over the subset) estimating Σ. Correlations between
the batches of one epoch (a partition of the N samples) are not reproduced in that case. When
|B'| would exceed N0/2 (κ small: |B| close to N) the draw is kept as dense weights counts/|B'|.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .batch import Batch
from .discrete import SimulationResult, simulate_discrete

__all__ = ["BatchSampler", "simulate_minibatch", "summarize_paths"]


class BatchSampler:
    """The batches (:class:`~lightning_ttp.dynamics.batch.Batch`) of P paths at every step,
    drawn lazily epoch by epoch.

    Path p draws from ``numpy.random.default_rng([seed, p])``: one permutation (or the
    with-replacement draws of each batch) per epoch, so a path's batches do not depend on how
    many paths are simulated. An epoch's batches are built at once and moved to ``device``.
    """

    def __init__(self, n_kernel: int, batch_size: int, num_paths: int, *, n_total: int | None = None,
                 drop_last: bool = False, shuffle: bool = True, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        n_total = n_kernel if n_total is None else int(n_total)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n_total < n_kernel:
            raise ValueError(f"n_total ({n_total}) must be >= the kernel samples ({n_kernel})")
        if drop_last and batch_size > n_total:
            raise ValueError(
                f"batch_size {batch_size} > dataset size {n_total} with drop_last=True: no optimiser step "
                "would ever run; lower the batch size or set drop_last=False"
            )
        self.n0, self.n, self.b, self.p = n_kernel, n_total, int(batch_size), int(num_paths)
        self.drop_last, self.shuffle = drop_last, shuffle
        self.device = torch.device("cpu") if device is None else torch.device(device)
        full, rest = divmod(self.n, self.b)
        self.sizes = [self.b] * full + ([] if (drop_last or rest == 0) else [rest])
        self.rngs = [np.random.default_rng([seed, p]) for p in range(self.p)]
        self._epoch = -1
        self._cache: list[Batch] = []

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sizes)

    def _permuted_epoch(self) -> list[Batch]:
        """N0 = N: consecutive chunks of one permutation per path (what a shuffling loader feeds)."""
        orders = np.stack([rng.permutation(self.n) if self.shuffle else np.arange(self.n) for rng in self.rngs])
        index = torch.from_numpy(orders).to(self.device)
        out, start = [], 0
        for size in self.sizes:
            weight = torch.full((self.p, size), 1.0 / size, dtype=torch.float64, device=self.device)
            out.append(Batch(weight, index[:, start:start + size]))
            start += size
        return out

    def _draws(self, size: int) -> int:
        """|B'|: with-replacement draws whose noise is that of ``size`` samples drawn without
        replacement from N (stochastic rounding of size/κ, E[1/|B'|] = κ/size); 0 for κ = 0."""
        kappa = (self.n - size) / (self.n - 1) if self.n > 1 else 0.0
        if kappa <= 0:
            return 0
        target = size / kappa
        low = math.floor(target)
        if low == target:
            return low
        p_low = (1.0 / target - 1.0 / (low + 1)) * low * (low + 1)  # P(|B'| = low)
        return low if self.rngs[0].random() < p_low else low + 1

    def _subset_epoch(self) -> list[Batch]:
        """N0 < N: each batch drawn with replacement from the N0 kernel samples (module docstring)."""
        out = []
        for size in self.sizes:
            draws = self._draws(size)
            if draws == 0:  # the whole set in one batch: the exact mean gradient
                out.append(Batch(torch.full((self.p, self.n0), 1.0 / self.n0, dtype=torch.float64,
                                            device=self.device)))
                continue
            index = np.stack([rng.integers(0, self.n0, size=draws) for rng in self.rngs])
            if draws <= self.n0 // 2:
                weight = torch.full((self.p, draws), 1.0 / draws, dtype=torch.float64, device=self.device)
                out.append(Batch(weight, torch.from_numpy(index).to(self.device)))
            else:
                counts = np.stack([np.bincount(row, minlength=self.n0) for row in index])
                out.append(Batch(torch.from_numpy(counts / draws).to(self.device)))
        return out

    def batch(self, t: int) -> Batch:
        """The batches of all paths at optimiser step t."""
        epoch, j = divmod(t, self.steps_per_epoch)
        while self._epoch < epoch:
            self._cache = self._permuted_epoch() if self.n0 == self.n else self._subset_epoch()
            self._epoch += 1
        return self._cache[j]


def summarize_paths(curves: np.ndarray, band: tuple[float, float] = (5.0, 95.0)):
    """Mean over paths and the (low, high) percentile band, each (T+1,)."""
    mean = curves.mean(axis=0)
    lo, hi = np.percentile(curves, band, axis=0)
    return mean, (lo, hi)


def simulate_minibatch(f0, targets, grams, loss, spec, lr_schedule, *, batch_size: int,
                       n_total: int | None = None, drop_last: bool = False, shuffle: bool = True,
                       num_paths: int = 8, seed: int = 0, jvp_w0=None,
                       settle_after: int | None = None) -> SimulationResult:
    """Monte Carlo mini-batch SGD; returns every path (summarise with :func:`summarize_paths`).

    All paths advance together: per group and step one product of the batch's columns of Θ
    with the batch gradients of all paths, on the Grams' device and in their precision (see
    :mod:`~lightning_ttp.dynamics.discrete`).
    """
    n0 = torch.as_tensor(f0).shape[0]
    sampler = BatchSampler(n0, batch_size, num_paths, n_total=n_total, drop_last=drop_last,
                           shuffle=shuffle, seed=seed, device=torch.as_tensor(grams[0]).device)
    return simulate_discrete(f0, targets, grams, loss, spec, lr_schedule, jvp_w0=jvp_w0,
                             batches=sampler.batch, num_paths=num_paths, settle_after=settle_after)
