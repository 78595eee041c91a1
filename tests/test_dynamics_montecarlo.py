"""Monte Carlo mini-batch SGD in function space vs real torch SGD runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from lightning_ttp.dynamics import BatchSampler, OptimizerSpec, get_loss, simulate_minibatch, summarize_paths

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


N, D, C, B = 48, 8, 3, 8


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    torch.manual_seed(3)
    model = torch.nn.Linear(D, C).double()
    base = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(base)
    J = torch.cat([j.reshape(N * C, -1) for j in jac.values()], 1)
    return model, x, y, model(x).detach(), J @ J.T


def real_sgd(model, x, y, steps, *, lr, momentum, seed, shuffle=True, drop_last=False):
    """Real mini-batch SGD as a DataLoader would feed it; loss on the whole training set per step."""
    m = torch.nn.Linear(D, C).double()
    m.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B, shuffle=shuffle,
                                         drop_last=drop_last, generator=torch.Generator().manual_seed(seed))
    out = []
    while len(out) < steps:
        for xb, yb in loader:
            with torch.no_grad():
                out.append(F.cross_entropy(m(x), y).item())
            if len(out) > steps:
                break
            opt.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
        if len(out) > steps:
            break
    while len(out) <= steps:
        with torch.no_grad():
            out.append(F.cross_entropy(m(x), y).item())
    return np.array(out[: steps + 1])


def test_sequential_batches_are_exact():
    # shuffle=False: every path sees the loader's fixed batches -> exact step-by-step agreement,
    # momentum included.
    model, x, y, f0, gram = setup()
    spec = OptimizerSpec.sgd(0.5, momentum=0.9)
    T = 20
    sim = simulate_minibatch(f0, y, [gram], get_loss("cross_entropy"), spec, spec.constant_schedule(T),
                             batch_size=B, shuffle=False, num_paths=1)
    real = real_sgd(model, x, y, T, lr=0.5, momentum=0.9, seed=0, shuffle=False)
    np.testing.assert_allclose(sim.loss[0], real, rtol=1e-6)


def test_short_last_batch_and_drop_last():
    s = BatchSampler(10, 4, 2, drop_last=False, seed=0)
    assert s.sizes == [4, 4, 2] and s.steps_per_epoch == 3
    w = torch.stack([s.batch(t).dense(10) for t in range(3)])  # one epoch: a partition of the 10 samples
    np.testing.assert_allclose((w > 0).sum(0).numpy(), 1)
    np.testing.assert_allclose(w[2][w[2] > 0].numpy(), 0.5)
    assert BatchSampler(10, 4, 1, drop_last=True).sizes == [4, 4]


def test_subset_mapping_matches_gradient_noise_of_full_dataset():
    # N0 = 20 kernel samples standing for N = 200: weights unbiased, noise variance = fpc * var / |B|.
    n0, n, b = 20, 200, 16
    s = BatchSampler(n0, b, 4000, n_total=n, seed=0)
    w = s.batch(0).dense(n0).numpy()  # (paths, n0)
    a = np.random.default_rng(1).normal(size=n0)
    est = w @ a
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-12)
    assert abs(est.mean() - a.mean()) < 4 * est.std() / np.sqrt(len(est))
    expected_var = a.var() / b * (n - b) / (n - 1)
    assert abs(est.var() / expected_var - 1) < 0.1


def test_mean_of_real_sgd_runs_lies_in_predicted_band():
    model, x, y, f0, gram = setup()
    T, lr, mom = 60, 0.5, 0.5
    spec = OptimizerSpec.sgd(lr, momentum=mom)
    sim = simulate_minibatch(f0, y, [gram], get_loss("cross_entropy"), spec, spec.constant_schedule(T),
                             batch_size=B, num_paths=24, seed=0)
    mean, (lo, hi) = summarize_paths(sim.loss)
    runs = np.stack([real_sgd(model, x, y, T, lr=lr, momentum=mom, seed=100 + s) for s in range(6)])
    real_mean = runs.mean(0)
    inside = (real_mean >= lo - 1e-12) & (real_mean <= hi + 1e-12)
    assert inside.mean() >= 0.9, inside.mean()
    assert np.mean(hi - lo) > 1e-4  # a real band, not a line
    assert real_mean[-1] < 0.9 * real_mean[0]


@pytest.mark.parametrize("kind", ["full", "trace"])
def test_sparse_batch_product_equals_the_dense_weights_product(kind):
    # Θ (w ⊙ G) from the batch's rows of Θ (embedding_bag) vs the dense (P, N·C) × Θ product,
    # repeated samples included (with-replacement draws add up); also K Grams side by side.
    from lightning_ttp.dynamics.adam import apply_blocks
    from lightning_ttp.dynamics.batch import Batch
    from lightning_ttp.dynamics.discrete import apply_kernel

    g = torch.Generator().manual_seed(0)
    n, c, p, k = 12, 3, 4, 5
    size = n * c if kind == "full" else n
    a = torch.randn(size, size, generator=g, dtype=torch.float64)
    gram, gram2 = a @ a.T, a.T @ a
    gsample = torch.randn(p, n, c, generator=g, dtype=torch.float64)
    index = torch.randint(0, n, (p, k), generator=g)
    index[:, 1] = index[:, 0]  # a repeated sample in every path
    batch = Batch(torch.rand(p, k, generator=g, dtype=torch.float64), index)
    dense = batch.dense(n)
    assert torch.allclose(dense.sum(1), batch.weight.sum(1))
    sparse_out = apply_kernel(gram, batch.gradient(gsample), kind, batch)
    dense_out = apply_kernel(gram, dense[..., None] * gsample, kind)
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-12, atol=1e-12)
    stacked = torch.cat([gram, gram2], 1)
    torch.testing.assert_close(apply_blocks(stacked, batch.gradient(gsample), kind, 2, batch),
                               apply_blocks(stacked, dense[..., None] * gsample, kind, 2), rtol=1e-12, atol=1e-12)


def test_subset_batches_are_sparse_draws_with_the_noise_of_the_full_dataset():
    # N0 = 64 kernel samples standing for N = 200, |B| = 8: |B'| ≈ |B|/κ draws with replacement
    # (8 or 9), kept as indices; unbiased, noise variance κ var/|B| (κ = (N − |B|)/(N − 1)).
    n0, n, b = 64, 200, 8
    s = BatchSampler(n0, b, 4000, n_total=n, seed=0)
    batches = [s.batch(t) for t in range(3)]
    assert all(bt.index is not None and bt.index.shape[1] in (8, 9) for bt in batches)
    w = batches[0].dense(n0).numpy()
    a = np.random.default_rng(1).normal(size=n0)
    est = w @ a
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-12)
    assert abs(est.mean() - a.mean()) < 4 * est.std() / np.sqrt(len(est))
    draws = np.array([s._draws(b) for _ in range(20000)])
    kappa = (n - b) / (n - 1)
    assert abs(np.mean(1.0 / draws) / (kappa / b) - 1) < 2e-3  # E[1/|B'|] = κ/|B|
    expected_var = a.var() / b * kappa
    assert abs(est.var() / expected_var - 1) < 0.1


def test_a_monte_carlo_continuation_settles_within_one_percent_of_the_drop():
    # Mini-batch noise does not keep a converged mean curve from settling (the change between
    # windows is within its noise), and the held tail stays within 1 % of the drop.
    from lightning_ttp.dynamics.discrete import SETTLE_TOLERANCE

    g = torch.Generator().manual_seed(0)
    n = 64
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    gram = (q * torch.logspace(0, -3, n, dtype=torch.float64)) @ q.T * n
    f0, y = torch.zeros(n, 3, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    spec, loss = OptimizerSpec.sgd(1.0), get_loss("cross_entropy")
    kw = dict(batch_size=16, num_paths=8, seed=1)
    full = simulate_minibatch(f0, y, [gram], loss, spec, spec.constant_schedule(600), **kw)
    held = simulate_minibatch(f0, y, [gram], loss, spec, spec.constant_schedule(600), settle_after=300, **kw)
    assert held.settled_at is not None and 300 <= held.settled_at < 600
    full_mean, held_mean = full.loss.mean(0), held.loss.mean(0)
    assert np.abs(held_mean - full_mean).max() <= SETTLE_TOLERANCE * (full_mean[0] - full_mean.min())
