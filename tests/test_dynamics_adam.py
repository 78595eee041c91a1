"""The batched Adam(W) simulation: exact where the approximation is exact, vectorisation and precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, jvp

from lightning_ttp.dynamics import BatchSampler, OptimizerSpec, get_loss, simulate_adam, simulate_minibatch

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py

N, D, C = 24, 5, 3


def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    torch.manual_seed(1)
    model = torch.nn.Linear(D, C).double()
    return model, x, y


def preconditioned_blocks(model, x, y, eps):
    """Independent reference: per tensor K_k = J_k diag(1/(|g_k| + ε)) J_kᵀ with g the full-batch gradient at w0
    (Adam's v̂ after one step is g²), the block RMS a_k = mean |g_k| and J_k·w_{0,k}."""
    base = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    def fn(sub):
        return functional_call(model, {**base, **sub}, (x,))

    grams, rms, jws = [], [], []
    for (name, w0), g in zip(base.items(), grads, strict=True):
        jac = jacrev(fn)({name: w0})[name].reshape(N * C, -1)
        grams.append(jac @ torch.diag(1.0 / (g.abs().reshape(-1) + eps)) @ jac.T)
        rms.append(float(g.abs().mean()))
        jws.append(jvp(fn, ({name: w0},), ({name: w0},))[1])
    return fn(base).detach(), grams, rms, sum(jws)


def real_adam(model, x, y, opt_cls, steps, **kw):
    m = torch.nn.Linear(D, C).double()
    m.load_state_dict(model.state_dict())
    opt = opt_cls(m.parameters(), **kw)
    out = []
    for _ in range(steps):
        loss = F.cross_entropy(m(x), y)
        out.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.append(F.cross_entropy(m(x), y).item())
    return np.array(out)


@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.Adam, {"lr": 0.05}),
                                         (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.5})])
def test_first_full_batch_step_is_exact_and_the_curve_follows_real_adam(opt_cls, kw):
    # The preconditioner from the full-batch gradient at w0 makes Adam's first step exact:
    # K r = J g/(|g| + ε) (docs/prediction.md); later steps are the approximation.
    model, x, y = setup()
    eps = 1e-8
    f0, grams, rms, jw = preconditioned_blocks(model, x, y, eps)
    spec = OptimizerSpec.from_optimizer(opt_cls([torch.nn.Parameter(torch.zeros(1))], eps=eps, **kw))
    sim = simulate_adam(f0, y, grams, [0, 0], [D * C, C], rms, get_loss("cross_entropy"), spec,
                        spec.constant_schedule(30), jvp_w0=[jw])
    real = real_adam(model, x, y, opt_cls, 30, eps=eps, **kw)
    np.testing.assert_allclose(sim.loss[0, :2], real[:2], rtol=1e-9)
    np.testing.assert_allclose(sim.loss[0], real, rtol=0.1)
    assert real[-1] < 0.7 * real[0]


def test_paths_are_simulated_independently_of_how_many_run_together():
    model, x, y = setup()
    f0, grams, rms, jw = preconditioned_blocks(model, x, y, 1e-8)
    spec = OptimizerSpec.from_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.02))
    curves = []
    for paths in (2, 5):
        sampler = BatchSampler(N, 8, paths, seed=3)
        curves.append(simulate_adam(f0, y, grams, [0, 0], [D * C, C], rms, get_loss("cross_entropy"), spec,
                                    spec.constant_schedule(20), jvp_w0=[jw], batches=sampler.batch,
                                    num_paths=paths).loss)
    np.testing.assert_allclose(curves[1][:2], curves[0], rtol=1e-12)
    assert np.abs(curves[1][2] - curves[1][3]).max() > 1e-6  # different batches, different paths


def test_float32_grams_multiply_in_float32_and_stay_within_rounding_of_float64():
    model, x, y = setup()
    base = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(base)
    jac = torch.cat([j.reshape(N * C, -1) for j in jac.values()], 1)
    gram, f0 = jac @ jac.T, model(x).detach()
    sgd = OptimizerSpec.sgd(0.5, momentum=0.9)
    loss = get_loss("cross_entropy")
    kw = dict(batch_size=8, num_paths=3, seed=1)
    exact = simulate_minibatch(f0, y, [gram], loss, sgd, sgd.constant_schedule(100), **kw).loss
    single = simulate_minibatch(f0, y, [gram.float()], loss, sgd, sgd.constant_schedule(100), **kw).loss
    assert single.dtype == np.float64
    np.testing.assert_allclose(single, exact, rtol=1e-5)
    assert np.abs(single - exact).max() > 0  # the product really ran in float32


def test_sparse_batches_give_the_curves_of_their_dense_weights():
    # The batch's rows of the block Grams (and rᵀ K_k r from those rows) against the same
    # batches as dense (P, N) weights through the dense product: the same AdamW curves.
    from lightning_ttp.dynamics.batch import Batch

    model, x, y = setup()
    f0, grams, rms, jw = preconditioned_blocks(model, x, y, 1e-8)
    spec = OptimizerSpec.from_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.02))
    curves = []
    for dense in (False, True):
        sampler = BatchSampler(N, 8, 3, seed=5)
        batches = (lambda t, s=sampler: Batch(s.batch(t).dense(N))) if dense else sampler.batch
        curves.append(simulate_adam(f0, y, grams, [0, 0], [D * C, C], rms, get_loss("cross_entropy"), spec,
                                    spec.constant_schedule(25), jvp_w0=[jw], batches=batches, num_paths=3).loss)
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-10)
    assert np.abs(curves[0][0] - curves[0][1]).max() > 1e-6  # the paths differ: real mini-batches
