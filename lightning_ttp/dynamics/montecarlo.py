"""Mini-batch SGD by Monte Carlo in function space.

Each step draws a batch the way a ``DataLoader`` does and applies the batch gradient to
*all* N outputs through the kernel (``discrete.simulate_discrete`` with batch weights):

    f_{t+1} = f_t − Θ_η (w_t ⊙ G(f_t)),   w_{t,i} = 1/|B_t| for i ∈ B_t, 0 otherwise

(plus the exact momentum / weight-decay terms). Batches are drawn **without replacement
within an epoch** (a fresh permutation every epoch, as ``shuffle=True``), consecutive
chunks of ``batch_size``; the last short batch is dropped when ``drop_last`` is set,
otherwise it is a smaller batch (mean over its own size). Several seeded paths
(``numpy.random.default_rng([seed, path])``) give the expected curve (mean over paths)
and a band (5–95 % quantiles by default).

**Kernel on a subset (N0 < N).** When the kernel was computed on N0 of the N training
samples, each step still uses the *real* batch sizes of an epoch over N samples, but the
batch is drawn **with replacement** from the N0 kernel samples and its deviation from the
full-subset gradient is rescaled by the finite-population factor of sampling without
replacement from N:

    w_t = 1/N0 + sqrt((N − |B|)/(N − 1)) · (counts/|B| − 1/N0).

Then E[w_t] = 1/N0 (unbiased: the mean gradient over the subset estimates the mean over
N), and the covariance of the batch gradient is Σ0/|B| · (N − |B|)/(N − 1), where Σ0 is the
per-sample gradient covariance over the subset: the gradient noise of batches of |B|
drawn without replacement from N (Σ0 estimates Σ). Correlations between the batches of
one epoch (a partition of the N samples) are not reproduced in that case.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .discrete import SimulationResult, simulate_discrete

__all__ = ["BatchSampler", "simulate_minibatch", "summarize_paths"]


class BatchSampler:
    """Batch weights w_t (P, N0) for every step, drawn lazily epoch by epoch.

    Path p draws from ``numpy.random.default_rng([seed, p])``: one permutation (or one
    multinomial draw per batch size) per epoch, so a path's batches do not depend on how many
    paths are simulated. An epoch's weights are built at once and moved to ``device``.
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
        self._cache = torch.empty(0)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sizes)

    def _draw_epoch(self) -> None:
        spe, sizes = self.steps_per_epoch, np.asarray(self.sizes)
        w = np.zeros((spe, self.p, self.n0))
        if self.n0 == self.n:
            # position k of the epoch's order belongs to batch batch_of[k] (weight 1/|B|)
            batch_of = np.repeat(np.arange(spe), sizes)
            for p, rng in enumerate(self.rngs):
                order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
                w[batch_of, p, order[: batch_of.size]] = 1.0 / sizes[batch_of]
        else:
            fpc = np.sqrt((self.n - sizes) / (self.n - 1)) if self.n > 1 else np.zeros(spe)
            pvals = np.full(self.n0, 1.0 / self.n0)
            for p, rng in enumerate(self.rngs):
                # the full batches, then the short one: the same stream as one draw per batch
                counts = np.concatenate([rng.multinomial(s, pvals, size=len(list(run)))
                                         for s, run in itertools.groupby(self.sizes)])
                w[:, p] = 1.0 / self.n0 + fpc[:, None] * (counts / sizes[:, None] - 1.0 / self.n0)
        self._cache = torch.from_numpy(w).to(self.device)

    def weights(self, t: int) -> torch.Tensor:
        epoch, j = divmod(t, self.steps_per_epoch)
        while self._epoch < epoch:
            self._draw_epoch()
            self._epoch += 1
        return self._cache[j]


def summarize_paths(curves: np.ndarray, band: tuple[float, float] = (5.0, 95.0)):
    """Mean over paths and the (low, high) percentile band, each (T+1,)."""
    mean = curves.mean(axis=0)
    lo, hi = np.percentile(curves, band, axis=0)
    return mean, (lo, hi)


def simulate_minibatch(f0, targets, grams, loss, spec, lr_schedule, *, batch_size: int,
                       n_total: int | None = None, drop_last: bool = False, shuffle: bool = True,
                       num_paths: int = 8, seed: int = 0, jvp_w0=None) -> SimulationResult:
    """Monte Carlo mini-batch SGD; returns every path (summarise with :func:`summarize_paths`).

    All paths advance together: one (P, N·C) × (N·C, N·C) product per group and step, on the
    Grams' device and in their precision (see :mod:`~lightning_ttp.dynamics.discrete`).
    """
    n0 = torch.as_tensor(f0).shape[0]
    sampler = BatchSampler(n0, batch_size, num_paths, n_total=n_total, drop_last=drop_last,
                           shuffle=shuffle, seed=seed, device=torch.as_tensor(grams[0]).device)
    return simulate_discrete(f0, targets, grams, loss, spec, lr_schedule, jvp_w0=jvp_w0,
                             weights=sampler.weights, num_paths=num_paths)
