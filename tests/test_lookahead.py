"""The fit-start look-ahead: exact where the linearisation is, the real steps where it is not, no trace left."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ttp import predict_training_time
from lightning_ttp.api import predict_run
from lightning_ttp.pipeline.lookahead import _batches, joined_curve, look_ahead, lookahead_steps
from lightning_ttp.pipeline.plan import plan_run
from lightning_ttp.pipeline.prediction import Prediction

pytestmark = pytest.mark.usefixtures("_one_thread")


def _data(n=64, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def _mlp(frozen_body: bool, seed=1, d=6, c=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, c)).double()
    if frozen_body:
        model[0].requires_grad_(False)
    return model


def test_lookahead_steps_are_a_small_share_of_the_run():
    assert lookahead_steps(10) == 3 and lookahead_steps(1000) == 50 and lookahead_steps(10**6) == 100
    assert lookahead_steps(5) == 0  # too short to look ahead


@pytest.mark.parametrize("batch_size", [None, 16])
def test_a_model_linear_in_its_parameters_gets_the_open_loop_prediction_exactly(batch_size):
    # the real steps are the linearised ones: S = C, whatever the batches, so the look-ahead changes nothing
    x, y = _data()
    model = _mlp(frozen_body=True)
    data = (x, y) if batch_size is None else torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    ahead = predict_training_time(model, data, opt, 60, num_paths=3)
    plain = predict_training_time(model, data, opt, 60, num_paths=3, lookahead=False)
    assert ahead.diagnostics["lookahead"]["steps"] == 3
    assert ahead.diagnostics["lookahead"]["level_ratio"] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(ahead.loss, plain.loss, rtol=1e-9)
    np.testing.assert_allclose(ahead.continuation, plain.continuation, rtol=1e-9)


def test_the_joined_curve_starts_the_continuation_from_the_real_networks_loss_after_its_steps():
    # full-batch GD on the whole data set: the control is the open loop itself, so at step k the
    # curve is the real network's loss after k real GD steps (an independent torch loop here)
    x, y = _data()
    model = _mlp(frozen_body=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.8)
    plan = plan_run((x, y), opt, 40)
    run = predict_run(model, (x, y), opt, plan, lookahead=False, num_paths=1)
    ahead = look_ahead(model, opt, run.spec, run.inputs, run.targets, plan, run.kernel, run.prediction)
    k = ahead.steps
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.8)
    real = []
    for _ in range(k):
        loss = F.cross_entropy(twin(x), y)
        real.append(loss.item())
        twin_opt.zero_grad()
        loss.backward()
        twin_opt.step()
    np.testing.assert_allclose(ahead.losses, real, rtol=1e-9)
    with torch.no_grad():
        after = F.cross_entropy(twin(x), y).item()
    assert ahead.loss[k] == pytest.approx(after, rel=1e-6)
    assert ahead.loss[0] == pytest.approx(run.prediction.loss[0])  # the ramp starts at the open loop's L_0
    assert ahead.level_ratio == pytest.approx(after / run.prediction.loss[k], rel=1e-6)


def test_the_lookahead_leaves_model_buffers_grads_optimiser_and_rng_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(32, 3))
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # a momentum buffer to keep, and .grad left set
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    rng = torch.get_rng_state()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    pred = predict_training_time(model, loader, opt, 60, num_paths=2)
    assert pred.diagnostics["lookahead"]["steps"] == 3
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    for key, value in model.state_dict().items():  # running statistics and num_batches_tracked included
        assert torch.equal(value, state[key]), key
    for p, g, m in zip(model.parameters(), grads, momentum, strict=True):
        assert torch.equal(p.grad, g) and torch.equal(opt.state[p]["momentum_buffer"], m)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def test_the_same_call_twice_gives_the_same_prediction_whatever_the_callers_rng():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(32, 3))
    x, y = torch.randn(80, 6), torch.randint(0, 3, (80,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = predict_training_time(model, loader, opt, 40, num_paths=2)
    torch.rand(1000)  # the caller draws in between
    second = predict_training_time(model, loader, opt, 40, num_paths=2)
    assert first.loss.tobytes() == second.loss.tobytes()


def test_rejoined_scales_band_and_continuation_to_the_new_curve():
    steps = np.arange(5)
    loss = np.array([2.0, 1.5, 1.0, 0.8, 0.5])
    pred = Prediction(steps, loss, (loss * 0.9, loss * 1.1), np.linspace(0.5, 0.1, 5), None, {},
                      np.array([0.45, 0.4]), (np.array([0.4, 0.35]), np.array([0.5, 0.45])))
    new = loss * np.array([1.0, 0.9, 0.8, 0.7, 0.6])
    out = pred.rejoined(new)
    np.testing.assert_allclose(out.loss, new)
    np.testing.assert_allclose(out.loss_band[0], new * 0.9)
    np.testing.assert_allclose(out.continuation, [0.45 * 0.6, 0.4 * 0.6])
    np.testing.assert_allclose(out.error, pred.error)
    with pytest.raises(ValueError, match="shape"):
        pred.rejoined(new[:3])


def test_joined_curve_ramps_to_the_level_and_follows_the_ratio_after():
    p = np.array([1.0, 0.8, 0.6, 0.5, 0.4])
    control = np.array([1.0, 0.8, 0.5, 0.4, 0.3])
    continuation = np.array([0.25, 0.1, 0.05])  # steps 2..4
    curve = joined_curve(p, continuation, control, 2)
    np.testing.assert_allclose(curve, [1.0, 0.8 * (1 + (0.5 - 1) / 2), 0.6 * 0.5, 0.5 * 0.25, 0.4 / 6])


def test_lookahead_batches_follow_the_plan():
    x, y = _data(n=40)
    full = plan_run((x, y), torch.optim.SGD(_mlp(True).parameters(), lr=0.1), 10)
    assert all(torch.equal(b, torch.arange(40)) for b in _batches(40, full, 3, 0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    ordered = plan_run(loader, torch.optim.SGD(_mlp(True).parameters(), lr=0.1), 10)
    batches = _batches(40, ordered, 3, 0)
    assert [b.tolist() for b in batches] == [list(range(16)), list(range(16, 32)), list(range(16))]
