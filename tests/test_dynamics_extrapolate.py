"""Appendix D: power-law spectrum fit and subset -> larger-dataset extrapolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ttp.dynamics import (
    epsilon_training_time,
    extrapolate_spectrum,
    extrapolated_mse_curve,
    fit_power_law,
    mse_curve_from_spectrum,
    mse_spectrum,
)

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


DIM, SLOPE = 1500, 1.5


def power_law_data(n, seed=1):
    """Gaussian features with covariance diag(k^-s): the Gram spectrum / N follows k^-s."""
    scales = np.arange(1, DIM + 1) ** (-SLOPE / 2)
    w = np.random.default_rng(0).normal(size=DIM) * scales
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, DIM)) * scales
    y = x @ w + 0.1 * r.normal(size=n)
    return torch.tensor(x), torch.tensor(y)[:, None]


def test_fit_recovers_exact_power_law():
    k = np.arange(1, 301)
    law = fit_power_law(2.5 * k**-1.3)
    assert law.c == pytest.approx(2.5, rel=1e-10) and law.s == pytest.approx(1.3, rel=1e-10)
    noisy = 2.5 * k**-1.3 * np.exp(0.05 * np.random.default_rng(0).normal(size=k.size))
    law = fit_power_law(noisy)
    assert law.s == pytest.approx(1.3, rel=0.02)
    with pytest.raises(ValueError):
        fit_power_law([1.0, 0.0, 0.0])


def test_subset_extrapolation_recovers_large_n_spectrum_and_curve():
    x, y = power_law_data(800)
    n0, n = 100, 800
    sp0 = mse_spectrum(torch.zeros(n0, 1), y[:n0], x[:n0] @ x[:n0].T)
    sp = mse_spectrum(torch.zeros(n, 1), y, x @ x.T)
    law = fit_power_law(sp0.eigvals, k_max=50)
    assert law.s == pytest.approx(SLOPE, rel=0.1)  # the subset sees the true slope

    total = float(sp.proj.sum())  # ||δy||²/(N C): known from labels and initial predictions
    lam, p, _ = extrapolate_spectrum(sp0.eigvals, sp0.proj, n0, n, alpha=0.0, fit_k_max=50, total=total)
    assert lam.size == p.size == n
    np.testing.assert_allclose(lam[:30], sp.eigvals[:30], rtol=0.3)
    k0 = 25
    lam, p, _ = extrapolate_spectrum(sp0.eigvals, sp0.proj, n0, n, alpha=0.15, fit_k_max=50, total=total, k0=k0)
    assert p.sum() == pytest.approx(total, rel=1e-9)
    np.testing.assert_array_equal(p[: k0 - 1], sp0.proj[: k0 - 1])
    lam2, p2, _ = extrapolate_spectrum(sp0.eigvals, sp0.proj, n0, n, k0=k0, fit_k_max=50)
    assert p2.sum() == pytest.approx(sp0.proj.sum(), rel=1e-9)  # default total: the subset L0
    assert np.all(np.diff(p2[k0 - 1 :]) <= 0) and p2[-1] < p2[k0 - 1]
    assert np.all(np.diff(p[k0 - 1 :]) <= 0)  # a decaying power-law tail
    # Slope correction: the extrapolated spectrum decays faster than the fitted subset law.
    assert lam[-1] < fit_power_law(sp0.eigvals, k_max=50)(np.array([n]))[0]

    lr = np.full(300, 0.2)
    big = mse_curve_from_spectrum(sp.eigvals, sp.proj, lr, 1)
    pred = mse_curve_from_spectrum(lam, p, lr, 1)
    small = mse_curve_from_spectrum(sp0.eigvals, sp0.proj, lr, 1)
    one_call = extrapolated_mse_curve(torch.zeros(n0, 1), y[:n0], x[:n0] @ x[:n0].T, lr, n, total=total, k0=k0,
                                      alpha=0.15)
    for eps in (0.1, 0.01):
        t_big, t_pred, t_small = (epsilon_training_time(c, eps) for c in (big, pred, small))
        assert abs(t_pred - t_big) < abs(t_small - t_big), (eps, t_big, t_pred, t_small)
        t_one = epsilon_training_time(one_call, eps)
        assert abs(t_one - t_big) < abs(t_small - t_big), (eps, t_big, t_one, t_small)
