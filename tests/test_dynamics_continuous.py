"""ODE (LSODA), SDE (Euler–Maruyama) and the MSE closed form against the discrete dynamics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from lightning_ttp.dynamics import (
    OptimizerSpec,
    get_loss,
    simulate_discrete,
    simulate_minibatch,
    simulate_mse_closed_form,
    simulate_ode,
    simulate_sde,
    stability_report,
    summarize_paths,
)

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


def gram_of_linear(n=30, d=8, c=3, task="ce", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g) if task == "ce" else torch.randn(n, c, generator=g,
                                                                                  dtype=torch.float64)
    torch.manual_seed(seed + 1)
    model = torch.nn.Linear(d, c).double()
    base = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(base)
    J = torch.cat([j.reshape(n * c, -1) for j in jac.values()], 1)
    return model(x).detach(), y, J @ J.T


def test_ode_matches_discrete_at_small_lr():
    f0, y, gram = gram_of_linear()
    loss = get_loss("cross_entropy")
    # ELR η/(1-m): momentum lags ~m/(1-m) steps behind the ODE while the buffer fills (Appendix E).
    for spec, tol in [(OptimizerSpec.sgd(0.02), 0.03), (OptimizerSpec.sgd(0.01, momentum=0.5), 0.05),
                      (OptimizerSpec.sgd(0.002, momentum=0.9), 0.12)]:
        T = 150
        disc = simulate_discrete(f0, y, [gram], loss, spec, spec.constant_schedule(T)).loss[0]
        ode = simulate_ode(f0, y, [gram], loss, spec, spec.constant_schedule(T)).loss[0]
        drop = disc[0] - disc[-1]
        assert drop > 0.05 * disc[0]
        assert np.max(np.abs(ode - disc)) < tol * drop, tol
    # ...and visibly differ at a large lr (the ODE is the small-lr limit).
    spec = OptimizerSpec.sgd(3.0)
    disc = simulate_discrete(f0, y, [gram], loss, spec, spec.constant_schedule(20)).loss[0]
    ode = simulate_ode(f0, y, [gram], loss, spec, spec.constant_schedule(20)).loss[0]
    assert np.max(np.abs(ode - disc)) > 0.01


def test_mse_closed_form_equals_ode_and_discrete():
    f0, y, gram = gram_of_linear(task="mse")
    spec = OptimizerSpec.sgd(0.1, momentum=0.5)
    lrs = spec.constant_schedule(80) * np.linspace(1, 0.2, 80)[:, None]  # a decaying schedule
    ode = simulate_ode(f0, y, [gram], get_loss("mse"), spec, lrs)
    cf = simulate_mse_closed_form(f0, y, [gram], spec, lrs)
    np.testing.assert_allclose(cf.loss, ode.loss, rtol=1e-5)
    gd = OptimizerSpec.sgd(0.3)
    disc = simulate_discrete(f0, y, [gram], get_loss("mse"), gd, gd.constant_schedule(40))
    cfd = simulate_mse_closed_form(f0, y, [gram], gd, gd.constant_schedule(40), discrete=True)
    np.testing.assert_allclose(cfd.loss, disc.loss, rtol=1e-9)
    torch.testing.assert_close(cfd.final_outputs, disc.final_outputs)
    with pytest.raises(ValueError, match="weight decay"):
        simulate_mse_closed_form(f0, y, [gram], OptimizerSpec.sgd(0.1, weight_decay=0.1), lrs)


def test_sde_full_batch_is_ode_and_minibatch_tracks_monte_carlo():
    f0, y, gram = gram_of_linear(n=40)
    loss = get_loss("cross_entropy")
    spec = OptimizerSpec.sgd(0.3)
    lrs = spec.constant_schedule(60)
    ode = simulate_ode(f0, y, [gram], loss, spec, lrs).loss[0]
    full = simulate_sde(f0, y, [gram], loss, spec, lrs, batch_size=40, num_paths=2)
    # No noise with |B| = N; Euler with dt = 1 step is the discrete GD map.
    disc = simulate_discrete(f0, y, [gram], loss, spec, lrs).loss[0]
    np.testing.assert_allclose(full.loss[0], disc, rtol=1e-10)
    assert np.max(np.abs(full.loss[0] - ode)) < 0.05 * (ode[0] - ode[-1])
    # The SDE models independent batches (its noise has no epoch structure): compare it with
    # Monte Carlo on a large population (N0 = 40 kernel samples standing for N = 4000).
    mc = simulate_minibatch(f0, y, [gram], loss, spec, lrs, batch_size=4, num_paths=32, seed=1, n_total=4000)
    m_mc, _ = summarize_paths(mc.loss)
    for noise in ("rescaled", "exact"):
        sde = simulate_sde(f0, y, [gram], loss, spec, lrs, batch_size=4, num_paths=32, seed=1, noise=noise,
                           n_total=4000)
        m_sde, (lo, hi) = summarize_paths(sde.loss)
        assert np.mean(hi[1:] - lo[1:]) > 1e-2  # the noise is really there
        assert np.mean(np.abs(m_sde - m_mc)) < 0.1 * (m_mc[0] - m_mc[-1]), noise
    # Random reshuffling (without replacement within an epoch, N = 40) is far less noisy.
    rr = simulate_minibatch(f0, y, [gram], loss, spec, lrs, batch_size=4, num_paths=32, seed=1)
    assert rr.loss[:, -1].std() < 0.5 * mc.loss[:, -1].std()


def test_stability_diagnostic_flags_large_lr():
    f0, y, gram = gram_of_linear(task="mse")
    loss = get_loss("mse")
    rep = stability_report(f0, y, [gram], loss, OptimizerSpec.sgd(0.01), np.full((10, 1), 0.01))
    lr_star = rep["max_stable_lr"]
    assert rep["unstable_steps"] == 0 and rep["message"] is None
    # For MSE the bound is exact: just below lr* GD converges, just above it diverges.
    for factor, diverges in [(0.95, False), (1.05, True)]:
        spec = OptimizerSpec.sgd(factor * lr_star)
        out = simulate_discrete(f0, y, [gram], loss, spec, spec.constant_schedule(400)).loss[0]
        assert (out[-1] > out[0]) == diverges
    rep = stability_report(f0, y, [gram], loss, OptimizerSpec.sgd(1.05 * lr_star),
                           np.full((10, 1), 1.05 * lr_star))
    assert rep["unstable_steps"] == 10 and "unreliable above lr" in rep["message"]
    # Momentum raises the limit by (1 + m).
    rep_m = stability_report(f0, y, [gram], loss, OptimizerSpec.sgd(0.01, momentum=0.9),
                             np.full((10, 1), 0.01))
    assert rep_m["max_stable_lr"] == pytest.approx(1.9 * lr_star)


@pytest.mark.parametrize("task", ["ce", "mse"])
def test_ode_jacobian_matches_finite_differences(task):
    from lightning_ttp.dynamics.ode import FunctionSpaceDrift

    f0, y, gram = gram_of_linear(n=6, task=task)
    half = gram / 2
    spec = OptimizerSpec.sgd([0.3, 0.1], momentum=0.5, weight_decay=0.05)
    drift = FunctionSpaceDrift(f0, y, [half, half], get_loss("cross_entropy" if task == "ce" else "mse"), spec,
                               jvp_w0=[0.3 * f0, 0.1 * f0])
    u = 0.1 * torch.randn(2, 1, 6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lrs = np.array([0.3, 0.1])
    jac = drift.jacobian(u, lrs)
    base = drift(u, lrs).reshape(-1)
    fd = np.zeros_like(jac)
    for k in range(u.numel()):
        du = torch.zeros(u.numel(), dtype=torch.float64)
        du[k] = 1e-6
        fd[:, k] = ((drift(u + du.reshape(u.shape), lrs).reshape(-1) - base) / 1e-6).numpy()
    np.testing.assert_allclose(jac, fd, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scaled", [False, True])
def test_lambda_max_by_products_equals_the_dense_eigenvalue(scaled):
    # Above 300 rows λmax comes from Lanczos on products with the Grams as they are (a full and
    # a trace Gram, float32 and float64, optionally H^{1/2}·H^{1/2}); reference: eigvalsh of the
    # formed matrix.
    from lightning_ttp.dynamics.stability import _scale, lambda_max

    g = torch.Generator().manual_seed(0)
    n, c = 70, 5
    a = torch.randn(n * c, 40, generator=g, dtype=torch.float64)
    b = torch.randn(n, 30, generator=g, dtype=torch.float64)
    full, trace = (a @ a.T).float(), b @ b.T
    s = torch.randn(n, c, c, generator=g, dtype=torch.float64)
    s = s @ s.transpose(1, 2) / c if scaled else None
    weights = [0.7, 1.3]
    kron = torch.kron(trace, torch.eye(c, dtype=torch.float64))
    dense = 0.7 * full.double() + 1.3 * kron
    if scaled:
        dense = _scale(dense, s, n, c)
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    assert lambda_max([full, trace], weights, n, c, s) == pytest.approx(expected, rel=1e-4)
