"""Step 4 of the closed loop: what the simulation of the remaining steps k..T from f_k runs on.

The mini-batches of its Monte Carlo paths (:func:`continuation_batches`, the same draws as the
look-ahead's linearised control) and the kernel with its top eigenvalues clipped at the stability
limit of the remaining lrs (:func:`_stability_capped`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...dynamics import BatchSampler, OptimizerSpec, stability_report
from ..estimate import KernelEstimate

__all__ = ["continuation_batches"]


def continuation_batches(n0: int, batch_size: int, dataset_size: int, num_paths: int, *, seed: int, step: int,
                         device: torch.device | str) -> tuple[Callable[[int], Any] | None, int]:
    """(batches, paths) of a continuation from step ``step``: Monte Carlo mini-batches of
    ``num_paths`` paths drawn from ``seed + step`` (the batch function of a
    :class:`~lightning_ttp.dynamics.BatchSampler`), or the expected gradient ``(None, 1)`` for a
    full batch or ``num_paths=0``. The look-ahead's linearised control draws the same batches."""
    if batch_size >= dataset_size or num_paths < 1:
        return None, 1
    sampler = BatchSampler(n0, batch_size, num_paths, n_total=dataset_size, seed=seed + step, device=device)
    return sampler.batch, num_paths


def _stability_capped(ke: KernelEstimate, spec: OptimizerSpec, lrs: np.ndarray) -> tuple[list, float]:
    """Grams with their top eigenvalues clipped so that the remaining dynamics stay at ρ ≤ 1.

    ρ is the stability measure of :func:`lightning_ttp.dynamics.stability_report` at f_k (the
    kernel scaled by the loss curvature). With ρ_max > 1 every group's eigenvalues above
    λmax(Θ_g)/ρ_max are clipped to it, and again until ρ ≤ 1 (the curvature-weighted top
    direction need not be Θ's own): the top directions only, as a network at the edge of
    stability keeps its sharpness at the limit while the rest of its spectrum trains at full
    speed. Returns (grams, the uncapped ρ_max).
    """
    report = stability_report(ke.outputs, ke.targets, ke.grams, ke.loss, spec, lrs)
    first = rho = float(report["rho_max"])
    if rho <= 1.0:
        return ke.grams, rho
    eig = [torch.linalg.eigh(torch.as_tensor(g, dtype=torch.float64)) for g in ke.grams]
    caps = [float(vals[-1]) for vals, _ in eig]
    grams = ke.grams
    for _ in range(20):
        if rho <= 1.0 + 1e-9:
            break
        caps = [cap / rho for cap in caps]
        grams = [(vecs * vals.clamp(0.0, cap)) @ vecs.T for (vals, vecs), cap in zip(eig, caps, strict=True)]
        rho = float(stability_report(ke.outputs, ke.targets, grams, ke.loss, spec, lrs)["rho_max"])
    return grams, first
