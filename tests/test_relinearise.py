"""Re-linearised closed loop: exact continuation of real training for linear-in-parameters models,
drift measures against hand computation, the optimiser state in function space, the edge-of-stability cap."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ttp.api import estimate_kernel
from lightning_ttp.dynamics import OptimizerSpec, stability_report
from lightning_ttp.pipeline.closed_loop import (
    ClosedLoop,
    KernelDrift,
    LivePrediction,
    centred_alignment,
    checkpoint_steps,
    kernel_drift,
    relinearised_prediction,
)
from lightning_ttp.pipeline.closed_loop.blend import (
    _blend_weight,
    _level,
    _level_along,
    _smoothed_prefix,
    _speed,
    power_law_curve,
)
from lightning_ttp.pipeline.closed_loop.continuation import _stability_capped
from lightning_ttp.pipeline.closed_loop.drift import drift_multiplier, growth_multiplier, residual_growth
from lightning_ttp.pipeline.closed_loop.state import _current_state

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py

N, D, C, T = 40, 6, 3, 30


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def random_features_model(seed=1):
    """Frozen random features + trainable linear head: linear in its trainable parameters."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C)).double()
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m


def optimizer(name, params):
    if name == "momentum":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    if name == "nesterov_wd_dampening":
        return torch.optim.SGD(params, lr=0.4, momentum=0.8, dampening=0.1, weight_decay=0.05)
    if name == "nesterov_wd":
        return torch.optim.SGD(params, lr=0.4, momentum=0.8, nesterov=True, weight_decay=0.05)
    if name == "two_groups":
        w, b = params
        return torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [b], "lr": 0.1}], momentum=0.7)
    return torch.optim.AdamW(params, lr=0.02)


def train(model, opt, x, y, steps, *, at=(), callback=None):
    """Full-batch training; the loss at steps 0..steps (the last one after the final update)."""
    losses = []
    for t in range(steps):
        if t in at:
            callback(t, losses)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(F.cross_entropy(model(x), y).item())
    return np.array(losses)


def spec_of(opt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Adam approximation notice
        return OptimizerSpec.from_optimizer(opt)


@pytest.mark.parametrize("name", ["momentum", "nesterov_wd", "nesterov_wd_dampening", "two_groups"])
def test_continuation_equals_real_sgd_from_step_k(name):
    """From step k on, the re-linearised continuation is real torch.optim.SGD training, step for step."""
    x, y = data()
    model = random_features_model()
    opt = optimizer(name, [p for p in model.parameters() if p.requires_grad])
    spec = spec_of(opt)
    start = estimate_kernel(model, x, y, spec)
    live = {}

    def relinearise(t, losses):
        live[t] = relinearised_prediction(model, opt, spec, x, y, losses, T, start)

    real = train(model, opt, x, y, T, at=(10,), callback=relinearise)
    pred = live[10]
    assert pred.drift.scale == pytest.approx(1.0, abs=1e-12)  # linear model: the kernel does not move
    np.testing.assert_allclose(pred.continuation, real[10:], rtol=1e-9)
    # joined at the level of a line through the last observed losses: close, not exact (a curved prefix)
    np.testing.assert_allclose(pred.loss[10:], real[10:], rtol=5e-3)
    np.testing.assert_allclose(pred.loss[:10], real[:10])  # full batch: the prefix is not smoothed


def test_momentum_state_is_what_makes_it_exact():
    """The same continuation from a fresh optimiser (buffer dropped) is measurably different."""
    x, y = data()
    model = random_features_model()
    opt = optimizer("momentum", [p for p in model.parameters() if p.requires_grad])
    spec = spec_of(opt)
    start = estimate_kernel(model, x, y, spec)
    observed = train(model, opt, x, y, 10)[:-1]
    carried = relinearised_prediction(model, opt, spec, x, y, observed, T, start)
    fresh = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    dropped = relinearised_prediction(model, fresh, spec, x, y, observed, T, start)
    assert np.max(np.abs(carried.continuation - dropped.continuation)) > 1e-3  # the exact match is 1e-9


@pytest.mark.parametrize("extrapolate", ["growth", "scale"])
def test_closed_loop_stays_exact_over_several_calls(extrapolate):
    """Drift extrapolation, stability cap and speed calibration leave an exact linearisation unchanged."""
    x, y = data(1)
    model = random_features_model(3)
    opt = optimizer("momentum", [p for p in model.parameters() if p.requires_grad])
    spec = spec_of(opt)
    loop = ClosedLoop(spec, x, y, T, estimate_kernel(model, x, y, spec), fractions=(0.1, 0.3, 0.6),
                      extrapolate_drift=extrapolate)
    assert loop.steps == [3, 9, 18]
    preds = []
    real = train(model, opt, x, y, T, at=loop.steps, callback=lambda t, losses: preds.append(loop.update(model, opt,
                                                                                                        losses)))
    assert [p.step for p in preds] == loop.steps
    for p in preds:
        assert p.info["warp"] == pytest.approx(1.0, abs=1e-3)
        np.testing.assert_allclose(p.loss[p.step:real.size], real[p.step:], rtol=0.03)  # joined at the level
        np.testing.assert_allclose(p.multiplier, 1.0, atol=1e-9)
        np.testing.assert_allclose(p.continuation, real[p.step:], rtol=1e-4)
        assert p.drift.growth == pytest.approx(1.0, abs=1e-9)  # a constant kernel does not grow
    with pytest.raises(ValueError, match="extrapolate_drift must be"):
        relinearised_prediction(model, opt, spec, x, y, [1.0, 0.9], T, loop.start, extrapolate_drift="trace")


def test_adam_kernel_and_first_moment_against_hand_computation():
    """Adam: Θ = J diag(1/(√v̂+ε)) Jᵀ from the optimiser's own v̂ and B = J diag(1/(√v̂+ε)) m, by hand for f = xWᵀ + b."""
    x, y = data()
    torch.manual_seed(0)
    model = torch.nn.Linear(D, C).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.99))
    spec = spec_of(opt)
    train(model, opt, x, y, 7)
    ke, bufs, step = _current_state(model, x, y, spec, opt, loss="cross_entropy", output_fn=None, kernel="full",
                                    projection_dim=None, seed=0)
    assert step == 7
    st_w, st_b = opt.state[model.weight], opt.state[model.bias]
    corr = 1 - 0.99**7

    def precond(st):
        v_hat = st["exp_avg_sq"] / corr
        v_hat = torch.maximum(v_hat, 1e-2 * v_hat.mean())
        return 1.0 / (v_hat.sqrt() + 1e-8)

    pw, pb = precond(st_w), precond(st_b)  # (C, D), (C,)
    # ∂f_ic/∂W_c'd = δ_cc' x_id, ∂f_ic/∂b_c' = δ_cc'  =>  Θ[(i,c),(j,c')] = δ_cc' (Σ_d x_id x_jd P_cd + P_c)
    theta = torch.zeros(N, C, N, C, dtype=torch.float64)
    for c in range(C):
        theta[:, c, :, c] = (x * pw[c]) @ x.T + pb[c]
    np.testing.assert_allclose(ke.grams[0].numpy(), theta.reshape(N * C, N * C).numpy(), rtol=1e-8)
    image = x @ (pw * st_w["exp_avg"]).T + pb * st_b["exp_avg"]
    np.testing.assert_allclose(bufs[0].numpy(), image.numpy(), rtol=1e-8)
    with torch.no_grad():
        np.testing.assert_allclose(ke.outputs.numpy(), model(x).numpy(), rtol=1e-12)


def test_adamw_continuation_tracks_real_adamw():
    """AdamW with v̂ held at step k: a documented approximation, close to the real run on a linear model."""
    x, y = data()
    model = random_features_model()
    opt = optimizer("adamw", [p for p in model.parameters() if p.requires_grad])
    spec = spec_of(opt)
    start = estimate_kernel(model, x, y, spec)
    live = {}
    real = train(model, opt, x, y, T, at=(10,), callback=lambda t, losses: live.setdefault(
        t, relinearised_prediction(model, opt, spec, x, y, losses, T, start, extrapolate_drift=False)))
    rel = np.abs(live[10].continuation - real[10:]) / real[10:]
    assert rel.max() < 1e-2
    assert live[10].info["adam_step"] == 10


@pytest.mark.parametrize("blend", [False, True])
def test_power_law_blend_only_when_asked(blend):
    """Default: the live curve is the re-linearised one, no power law fitted; ``blend=True``: after a
    span of 10 % of T since the previous call, L̂ = w R + (1 − w) P with the exact R weighted near 1."""
    x, y = data(1)
    model = random_features_model(3)
    opt = optimizer("momentum", [p for p in model.parameters() if p.requires_grad])
    spec = spec_of(opt)
    loop = ClosedLoop(spec, x, y, T, estimate_kernel(model, x, y, spec), fractions=(0.1, 0.3, 0.6), blend=blend)
    preds = []
    train(model, opt, x, y, T, at=loop.steps, callback=lambda t, losses: preds.append(loop.update(model, opt, losses)))
    last = preds[-1]
    relinearised, weight = last.info["relinearised_loss"], last.info["blend_weight"]
    if not blend:
        assert weight == 1.0 and "power_law_loss" not in last.info
        np.testing.assert_array_equal(last.loss, relinearised)
    else:
        power = last.info["power_law_loss"]
        assert 0.99 < weight < 1.0
        np.testing.assert_allclose(last.loss[last.step:],
                                   weight * relinearised[last.step:] + (1 - weight) * power[last.step:])


def test_drift_measures_against_hand_computation():
    rng = np.random.default_rng(0)
    n, c = 7, 2
    a, b = rng.standard_normal((n * c, 9)), rng.standard_normal((n * c, 9))
    g0, g1 = [torch.as_tensor(a @ a.T), torch.as_tensor(b @ b.T)], [torch.as_tensor(2 * a @ a.T),
                                                                     torch.as_tensor(5 * b @ b.T)]
    y = torch.as_tensor([0, 1, 1, 0, 1, 0, 0])
    lrs = [0.1, 0.3]
    drift = kernel_drift(g0, g1, y, lrs, num_outputs=c, step=4)
    assert drift.step == 4
    assert drift.scale == pytest.approx((0.1 * 2 * np.trace(a @ a.T) + 0.3 * 5 * np.trace(b @ b.T))
                                        / (0.1 * np.trace(a @ a.T) + 0.3 * np.trace(b @ b.T)))
    # centred alignment by loops over the per-sample kernel K_ij = Σ_c Θ_(i,c),(j,c)
    theta = 0.1 * 2 * a @ a.T + 0.3 * 5 * b @ b.T
    k = np.array([[sum(theta[i * c + q, j * c + q] for q in range(c)) for j in range(n)] for i in range(n)])
    onehot = np.eye(c)[y.numpy()]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, tc = h @ k @ h, h @ onehot @ onehot.T @ h
    assert drift.alignment == pytest.approx(np.sum(kc * tc) / np.linalg.norm(kc) / np.linalg.norm(tc))
    assert centred_alignment(torch.as_tensor(onehot @ onehot.T), torch.as_tensor(onehot)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one of each per param group"):
        kernel_drift(g0, g1[:1], y, lrs, num_outputs=c)


def test_drift_multiplier_follows_a_logarithmic_trend():
    alpha, beta = 1.0, 0.5
    hist = [KernelDrift(t, alpha + beta * np.log1p(t), 0.0, 0.0) for t in (3, 8, 15)]
    m = drift_multiplier(hist, 15, 60, max_drift=10.0)
    t = np.arange(15, 60)
    np.testing.assert_allclose(m, (alpha + beta * np.log1p(t)) / (alpha + beta * np.log1p(15)), rtol=1e-10)
    assert drift_multiplier(hist, 15, 60, max_drift=1.2).max() == pytest.approx(1.2)


def test_growth_along_the_loss_gradient_matches_the_jacobians():
    # Θ = J Jᵀ per group: rᵀΘr = ‖Jᵀr‖², so g = Σ η‖J_kᵀr‖² / Σ η‖J_0ᵀr‖² (full kernel, rows (i, c));
    # the trace kernel K = ΦΦᵀ (N, N) gives Σ_c ‖Φᵀ r_c‖²
    rng = np.random.default_rng(1)
    n, c, lrs = 6, 3, [0.2, 0.7]
    j0, jk = ([rng.standard_normal((n * c, 5)) for _ in lrs] for _ in range(2))
    r = rng.standard_normal((n, c))
    expected = (sum(eta * np.sum((j.T @ r.reshape(-1)) ** 2) for eta, j in zip(lrs, jk))
                / sum(eta * np.sum((j.T @ r.reshape(-1)) ** 2) for eta, j in zip(lrs, j0)))
    grams = [[torch.as_tensor(j @ j.T) for j in js] for js in (j0, jk)]
    assert residual_growth(*grams, torch.as_tensor(r), lrs) == pytest.approx(expected, rel=1e-12)
    phi0, phik = rng.standard_normal((n, 4)), rng.standard_normal((n, 4))
    trace = residual_growth([torch.as_tensor(phi0 @ phi0.T)], [torch.as_tensor(phik @ phik.T)],
                            torch.as_tensor(r), [1.0])
    assert trace == pytest.approx(np.sum((phik.T @ r) ** 2) / np.sum((phi0.T @ r) ** 2), rel=1e-12)
    drift = kernel_drift(*grams, torch.as_tensor([0, 1, 2, 0, 1, 2]), lrs, num_outputs=c, step=3,
                         residual=torch.as_tensor(r))
    assert drift.growth == pytest.approx(expected, rel=1e-12)
    assert np.isnan(kernel_drift(*grams, torch.as_tensor([0, 1, 2, 0, 1, 2]), lrs, num_outputs=c).growth)


def test_growth_multiplier_continues_the_last_two_calls_on_a_log_clock():
    hist = [KernelDrift(10, 1.0, 0.0, 0.0, 1.2), KernelDrift(20, 1.0, 0.0, 0.0, 1.5)]
    beta = 0.3 / np.log(21 / 11)
    t = np.arange(20, 200)
    np.testing.assert_allclose(growth_multiplier(hist, 20, 200, max_drift=10.0),
                               (1.5 + beta * np.log((1 + t) / 21)) / 1.5, rtol=1e-12)
    assert growth_multiplier(hist, 20, 200, max_drift=1.1).max() == pytest.approx(1.1)
    first = growth_multiplier(hist[:1], 10, 50, max_drift=10.0)  # from the fit-start kernel, g_0 = 1
    np.testing.assert_allclose(first, (1.2 + 0.2 / np.log(11) * np.log((1 + np.arange(10, 50)) / 11)) / 1.2)
    assert np.all(growth_multiplier(hist, 30, 60) == 1.0)  # no measurement at this step: held
    unmeasured = [KernelDrift(20, 1.0, 0.0, 0.0)]
    assert np.all(growth_multiplier(unmeasured, 20, 60) == 1.0)


def test_stability_cap_brings_rho_to_one():
    """Above the stability limit the capped kernel is at ρ = 1 (checked by stability_report)."""
    x, y = data()
    model = random_features_model()
    spec = spec_of(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    ke = estimate_kernel(model, x, y, spec)
    rho0 = stability_report(ke.outputs, ke.targets, ke.grams, ke.loss, spec, np.ones((5, 1)))["rho_max"]
    lrs = np.full((5, 1), 3.0 / rho0)
    grams, rho = _stability_capped(ke, spec, lrs)
    assert rho == pytest.approx(3.0, rel=1e-6)
    after = stability_report(ke.outputs, ke.targets, grams, ke.loss, spec, lrs)["rho_max"]
    assert after == pytest.approx(1.0, abs=1e-6)
    assert _stability_capped(ke, spec, lrs / 10)[0] is ke.grams  # stable: untouched


def test_speed_calibration_recovers_a_time_warp():
    t = np.arange(61, dtype=np.float64)
    previous = np.exp(-t / 20)
    observed = np.exp(-(10 + 2.0 * (t[:40] - 10).clip(0)) / 20)  # twice as fast from step 10 on
    assert _speed(previous, 10, observed, prior=1.0) == pytest.approx(2.0, rel=0.05)
    assert _speed(previous, 10, observed[:12], prior=1.0) is None  # fewer than 3 losses since the call


def test_level_from_the_calibration_is_less_noisy_than_a_line():
    """ℓ_k along the previous curve from all 30 noisy losses since its call, against a line through
    the last 14 (the first call's rule): under half the error; a warped run's level is followed."""
    t = np.arange(101, dtype=np.float64)
    truth = 0.5 + np.exp(-t / 20)
    rng = np.random.default_rng(0)
    fitted, line = [], []
    for _ in range(40):
        observed = truth[:40] + rng.normal(0, 0.05, 40)
        fitted.append(_level_along(truth, 10, observed, 1.0) - truth[40])
        line.append(_level(observed, 40, 7) - truth[40])
    assert np.sqrt(np.mean(np.square(fitted))) < 0.5 * np.sqrt(np.mean(np.square(line)))
    faster = 0.5 + np.exp(-(10 + 2.0 * (t - 10).clip(0)) / 20)  # twice as fast from step 10 on
    assert _level_along(truth, 10, faster[:40], 2.0) == pytest.approx(faster[40], rel=1e-3)


def test_prefix_and_level_smoothed_against_the_expected_curve_keep_the_steep_start():
    """Noisy losses of a curve that falls by half in its first 10 steps, smoothed over 11: as their
    difference from an expected curve of the same shape (here 10 % slower, a wrong speed) L_0 and
    the level at k = 20 are within the noise, where the smoothing of the losses themselves puts L_0
    far too low (the local line cuts the corner) and takes the level from a line through a curve."""
    t = np.arange(201, dtype=np.float64)
    truth = 1.0 + np.exp(-t / 3)
    expected = 1.0 + np.exp(-t / 3.3)
    rng = np.random.default_rng(1)
    start, plain_start, level, plain_level = [], [], [], []
    for _ in range(50):
        observed = truth[:20] + rng.normal(0, 0.1, 20)
        start.append(_smoothed_prefix(observed, 11, expected)[0] - truth[0])
        plain_start.append(_smoothed_prefix(observed, 11, None)[0] - truth[0])
        level.append(_level(observed, 20, 11, expected) - truth[20])
        plain_level.append(_level(observed, 20, 11) - truth[20])
    assert abs(np.mean(start)) < 0.05 and np.mean(plain_start) < -0.2
    assert np.sqrt(np.mean(np.square(level))) < 0.3 * np.sqrt(np.mean(np.square(plain_level)))
    with pytest.raises(ValueError, match="cover steps 0..19"):
        _smoothed_prefix(truth[:20], 11, expected[:10])
    diverged = np.where(t < 5, expected, np.inf)  # a simulated curve that diverged: the losses smoothed alone
    observed = truth[:20] + rng.normal(0, 0.1, 20)
    np.testing.assert_array_equal(_smoothed_prefix(observed, 11, diverged), _smoothed_prefix(observed, 11, None))
    assert _level(observed, 20, 11, diverged) == _level(observed, 20, 11)


def test_checkpoints_and_errors():
    assert checkpoint_steps(1000) == [20, 50, 100, 200, 400]
    assert checkpoint_steps(40) == [3, 4, 8, 16]  # ≥ 3 observed losses, distinct
    x, y = data()
    model = random_features_model()
    opt = optimizer("momentum", [p for p in model.parameters() if p.requires_grad])
    spec = spec_of(opt)
    start = estimate_kernel(model, x, y, spec)
    with pytest.raises(ValueError, match="1 <= step < total_steps"):
        relinearised_prediction(model, opt, spec, x, y, [], T, start)
    with pytest.raises(ValueError, match="fewer than total_steps"):
        relinearised_prediction(model, opt, spec, x, y, [1.0, 0.9], T, start, lr_schedule=np.ones(5))
    with_gap = relinearised_prediction(model, opt, spec, x, y, [1.2, np.nan, 1.0, 0.9], T, start)
    np.testing.assert_allclose(with_gap.loss[:4], [1.2, 1.1, 1.0, 0.9])  # a missing loss is interpolated
    with pytest.raises(TypeError, match="own drift history"):
        ClosedLoop(spec, x, y, T, start, history=[])


@pytest.mark.parametrize("name", ["momentum", "adamw"])
def test_model_and_optimizer_left_unchanged(name):
    x, y = data()
    model = random_features_model()
    opt = optimizer(name, [p for p in model.parameters() if p.requires_grad])
    spec = spec_of(opt)
    start = estimate_kernel(model, x, y, spec)
    observed = train(model, opt, x, y, 5)[:-1]
    model.train()
    F.cross_entropy(model(x), y).backward()  # a pending gradient, as inside a training step
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    before_w = copy.deepcopy(model.state_dict())
    before_s = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    relinearised_prediction(model, opt, spec, x, y, observed, T, start)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, g) for p, g in zip([p for p in model.parameters() if p.requires_grad], grads,
                                                        strict=True))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_w[k])
    after_s = opt.state_dict()
    for k, st in before_s["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after_s["state"][k][key]))


def test_batchnorm_kernel_uses_batch_statistics():
    """With BatchNorm in train mode the kernel is J Jᵀ of the *batched* train-mode forward (each output
    depends on every sample through the batch statistics): against torch.func.jacrev on a copy, the
    momentum image J b as well; running statistics, modes and weights untouched."""
    from torch.func import functional_call, jacrev

    x, y = data()
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, C)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spec = spec_of(opt)
    start = estimate_kernel(model, x, y, spec)
    train(model, opt, x, y, 4)
    model.train()
    before = copy.deepcopy(model.state_dict())
    ke, bufs, _ = _current_state(model, x, y, spec, opt, loss="cross_entropy", output_fn=None, kernel="full",
                                 projection_dim=None, seed=0, reference=start)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    ref = copy.deepcopy(model)
    ref[1].track_running_stats = False
    params = dict(ref.named_parameters())
    jac = jacrev(lambda w: functional_call(ref, w, (x,)))({k: v.detach() for k, v in params.items()})
    j = torch.cat([jac[k].reshape(N * C, -1) for k in params], dim=1)
    b = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(ke.grams[0], j @ j.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bufs[0], (j @ b).reshape(N, C), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ke.outputs, ref(x).detach(), rtol=1e-12, atol=1e-12)
    eval_ke, _, _ = _current_state(model, x, y, spec, opt, loss="cross_entropy", output_fn=None, kernel="full",
                                   projection_dim=None, seed=0)
    assert (eval_ke.grams[0] - ke.grams[0]).norm() > 0.05 * ke.grams[0].norm()  # eval mode is another kernel
    fit_start = estimate_kernel(model, x, y, spec)  # the open loop's kernel: the same batch-statistics kernel
    assert fit_start.info["batch_statistics"]
    torch.testing.assert_close(fit_start.grams[0], j @ j.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(estimate_kernel(model, x, y, spec, batch_statistics=False).grams[0], eval_ke.grams[0])


def test_batch_statistics_jacobian_in_batched_backwards_and_without_them(monkeypatch):
    """The batch-statistics Jacobian's rows, ROW_CHUNK one-hot seeds per batched backward (four chunks
    here, the last one partial) and one backward per row where batching fails, against torch.func.jacrev;
    a parameter the outputs do not use has zero rows."""
    from torch.func import functional_call, jacrev

    from lightning_ttp.pipeline import batch_statistics

    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6, track_running_stats=False),
                                torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    x = torch.randn(35, 5, dtype=torch.float64)
    params = [*model.parameters(), unused]
    names = dict(model.named_parameters())
    jac = jacrev(lambda w: functional_call(model, w, (x,)))({k: v.detach() for k, v in names.items()})
    expected = [jac[k].reshape(105, -1) for k in names] + [torch.zeros(105, 2, dtype=torch.float64)]
    assert 105 > 3 * batch_statistics.ROW_CHUNK
    rows = batch_statistics._jacobian_rows(model(x), params)
    for got, want in zip(rows, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grad = torch.autograd.grad

    def no_batching(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    for got, want in zip(batch_statistics._jacobian_rows(model(x), params), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_power_law_fit_and_blend_weights():
    """The power-law fit recovers a + b(t+1)^-c; the blend weights are the inverse mean squared log errors
    of the previous call's two curves on the losses observed since it (1 below the minimum span)."""
    t = np.arange(200, dtype=np.float64)
    law = 0.2 + 1.5 * (t + 1) ** -0.7
    np.testing.assert_allclose(power_law_curve(law[:60], 200), law, rtol=1e-4)
    truth = np.exp(-t / 50)
    previous = LivePrediction(
        10, truth, truth, 1.0, KernelDrift(10, 1.0, 0.5, 0.5), np.ones(1), 0.0, 0.0,
        {"relinearised_loss": truth * np.exp(0.1), "power_law_loss": truth * np.exp(0.3)})
    assert _blend_weight(previous, truth[:40], min_span=20) == pytest.approx(0.9)  # 0.01^-1 / (0.01^-1 + 0.09^-1)
    assert _blend_weight(previous, truth[:25], min_span=20) == 1.0

