"""predict_training_time / estimate_kernel / simulate end to end (through the kernel engine)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ttp import Prediction, predict_training_time
from lightning_ttp.api import estimate_kernel, lr_schedule_from_scheduler, simulate
from lightning_ttp.dynamics import OptimizerSpec

N, D, C = 40, 6, 3


pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


def data(task="ce", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g) if task == "ce" else torch.randn(N, C, generator=g,
                                                                                  dtype=torch.float64)
    return x, y


def features_model(seed=1):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C)).double()
    m[0].requires_grad_(False)
    return m


def train(model, x, y, opt, loss_fn, steps, sched=None, batch_size=None):
    out = []
    bs = batch_size or x.shape[0]
    t = 0
    while t < steps:
        for s in range(0, x.shape[0], bs):
            if t == steps:
                break
            with torch.no_grad():
                out.append(loss_fn(model(x), y).item())
            opt.zero_grad()
            loss_fn(model(x[s : s + bs]), y[s : s + bs]).backward()
            opt.step()
            if sched is not None:
                sched.step()
            t += 1
    with torch.no_grad():
        out.append(loss_fn(model(x), y).item())
    return np.array(out)


@pytest.mark.parametrize("task", ["ce", "mse"])
def test_end_to_end_exact_for_linear_in_parameters_model(task):
    x, y = data(task)
    model = features_model()
    opt = torch.optim.SGD([{"params": [model[2].weight], "lr": 0.3, "weight_decay": 0.01},
                           {"params": [model[2].bias], "lr": 0.05}], momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    state = (sched.state_dict(), [g["lr"] for g in opt.param_groups])
    loss = "cross_entropy" if task == "ce" else "mse"
    pred = predict_training_time(model, (x, y), opt, 30, loss=loss, lr_scheduler=sched)
    assert (sched.state_dict(), [g["lr"] for g in opt.param_groups]) == state  # user's objects untouched
    real = train(model, x, y, opt, F.cross_entropy if task == "ce" else F.mse_loss, 30, sched)
    np.testing.assert_allclose(pred.loss, real, rtol=1e-4)
    assert pred.diagnostics["method"] == "discrete" and pred.loss_band is None
    assert (pred.error is not None) == (task == "ce")


def test_dataloader_minibatches_and_what_if():
    x, y = data()
    model = features_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    pred = predict_training_time(model, loader, opt, 20, num_paths=2)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    state = torch.random.get_rng_state()
    predict_training_time(model, shuffled, opt, 5, num_samples=16, num_paths=2)
    assert torch.equal(state, torch.random.get_rng_state())  # the user's RNG stream is untouched
    m = features_model()
    real = train(m, x, y, torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.5), F.cross_entropy, 20, batch_size=8)
    # Unshuffled loader: every Monte Carlo path sees the same batches as the real run -> exact.
    np.testing.assert_allclose(pred.loss, real, rtol=1e-4)
    assert pred.diagnostics["method"] == "mc" and pred.diagnostics["steps_per_epoch"] == 5

    spec = OptimizerSpec.from_optimizer(opt)
    ke = estimate_kernel(model, x, y, spec)
    tick = time.perf_counter()
    variants = {lr: simulate(ke, spec.replace(lr=lr), 50, 8, num_paths=8) for lr in (0.05, 0.5)}
    assert time.perf_counter() - tick < 10
    assert variants[0.5].loss[-1] < variants[0.05].loss[-1] - 0.05
    lo, hi = variants[0.5].loss_band
    assert np.all(lo <= variants[0.5].loss + 1e-12) and np.all(variants[0.5].loss <= hi + 1e-12)


def test_scheduler_schedule_epoch_interval_and_copy():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = lr_schedule_from_scheduler(sched, 6, interval="epoch", steps_per_epoch=2)
    np.testing.assert_allclose(lrs[:, 0], [1, 1, 0.5, 0.5, 0.25, 0.25])
    assert opt.param_groups[0]["lr"] == 1.0 and sched.last_epoch == 0
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    lrs = lr_schedule_from_scheduler(cos, 10)
    np.testing.assert_allclose(lrs[:, 0], 0.5 * (1 + np.cos(np.pi * np.arange(10) / 10)), rtol=1e-9)


def test_prediction_contents_and_round_trip():
    x, y = data()
    model = features_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pred = predict_training_time(model, (x, y), opt, 40, batch_size=10, num_paths=4, seed=3)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pred.steps.tolist() == list(range(41))
    for key in ("kernel_samples", "lambda_max", "max_stable_lr", "seconds", "method", "warnings"):
        assert key in pred.diagnostics
    again = Prediction.from_dict(json.loads(json.dumps(pred.to_dict())))
    assert again.to_dict() == pred.to_dict()
    np.testing.assert_array_equal(again.loss_band[0], pred.loss_band[0])
    same = predict_training_time(model, (x, y), opt, 40, batch_size=10, num_paths=4, seed=3)
    np.testing.assert_array_equal(same.loss, pred.loss)  # seeded


def test_bad_inputs_have_clear_errors():
    x, y = data()
    model = features_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        predict_training_time(model, (x, y), opt, 0)
    other = torch.optim.SGD(features_model(seed=5).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not (a parameter|parameters) of"):
        predict_training_time(model, (x, y), other, 5)
    with pytest.raises(ValueError, match="empty"):
        predict_training_time(model, (x[:0], y[:0]), opt, 5)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        predict_training_time(model, empty, opt, 5)
    pred = predict_training_time(model, (x, y), opt, 5)
    for eps in (0.0, 1.0, -0.1, 40):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            pred.training_time(eps)
    with pytest.raises(ValueError, match="method"):
        predict_training_time(model, (x, y), opt, 5, method="magic")


def test_stability_warning_and_adam_approximation():
    x, y = data()
    model = features_model()
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    ke = estimate_kernel(model, x, y, spec)
    safe = simulate(ke, spec, 10)
    lr_big = 3 * safe.diagnostics["max_stable_lr"]
    with pytest.warns(UserWarning, match="unreliable above lr") as record:
        big = simulate(ke, spec.replace(lr=lr_big), 10)
    assert big.diagnostics["unstable_steps"] == 10
    # the warning says what the simulation actually did
    message = next(str(w.message) for w in record if "unreliable" in str(w.message))
    assert ("simulated run diverges at this lr (max stable lr" in message) == big.diverged
    assert ("stayed finite" in message) == (not big.diverged)
    assert big.diverged == (not np.isfinite(big.loss).all() or big.loss.max() > 1e4 * big.loss[0])

    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    with pytest.warns(UserWarning, match="approximated"):
        pred = predict_training_time(model, (x, y), opt, 60)
    real = train(model, x, y, opt, F.cross_entropy, 60)
    assert pred.diagnostics["optimizer_kind"] == "adamw"
    # An approximation: same initial loss, the same order of decrease.
    assert pred.loss[0] == pytest.approx(real[0], rel=1e-9)
    drop_p, drop_r = pred.loss[0] - pred.loss[-1], real[0] - real[-1]
    assert 0.5 < drop_p / drop_r < 2.0


def test_unknown_optimizer_and_plateau_scheduler_warn():
    x, y = data()
    model = features_model()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.5)
    with pytest.warns(UserWarning, match="unknown optimiser RMSprop"):
        spec = OptimizerSpec.from_optimizer(opt)
    assert spec.kind == "sgd" and spec.groups[0].momentum == 0.5 and spec.groups[0].lr == 0.01
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.warns(UserWarning, match="ReduceLROnPlateau"):
        lrs = lr_schedule_from_scheduler(plateau, 4)
    np.testing.assert_array_equal(lrs, np.full((4, 1), 0.01))
    with pytest.raises(ValueError, match="maximize"):
        OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))


def test_closed_form_extrapolates_from_a_subset():
    x, y = data("mse")
    model = features_model()
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    ke = estimate_kernel(model, x[:20], y[:20], spec, loss="mse")
    small = simulate(ke, spec, 60, method="closed_form")
    large = simulate(ke, spec, 60, method="closed_form", dataset_size=400)
    assert "extrapolated from 20 to 400" in large.diagnostics["warnings"][-1]
    assert large.loss[0] == pytest.approx(small.loss[0])  # default total: the subset's L0
    assert large.loss[-1] > small.loss[-1]  # more data: slower to fit (Appendix D)
    with pytest.raises(ValueError, match="MSE"):
        simulate(estimate_kernel(model, x, torch.zeros(N, dtype=torch.long), spec), spec, 5, method="closed_form")


def test_a_linear_probe_is_simulated_on_its_kronecker_factor_and_its_continuation_is_held():
    # A frozen backbone + Linear head: simulate() runs on K (Θ = K ⊗ I_C) and gives the curve of
    # the full Gram; simulated past the run (horizon), the continuation stops once settled and the
    # step is reported.
    from lightning_ttp.dynamics import get_loss, simulate_minibatch

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh()).double().requires_grad_(False)
    model = torch.nn.Sequential(body, torch.nn.Linear(16, 3).double())
    x, y = torch.randn(48, 6, dtype=torch.float64), torch.randn(48, 3, dtype=torch.float64)
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model[1].parameters(), lr=0.3))
    ke = estimate_kernel(model, x, y, spec, kernel="full", loss="mse")
    pred = simulate(ke, spec, 400, 8, num_paths=4, horizon=200)
    assert ke.stability_cache["compact_grams"][0].shape == (48, 48)
    full = simulate_minibatch(ke.outputs, ke.targets, ke.grams, get_loss("mse"), spec,
                              spec.constant_schedule(400), batch_size=8, num_paths=4)
    settled = pred.diagnostics.extra["settled_at"]
    assert 200 <= settled < 400
    np.testing.assert_allclose(pred.loss, full.loss.mean(0)[:201], rtol=1e-9)
    assert np.all(pred.continuation[settled - 200:] == pred.continuation[-1])
