"""The cost budget chooses the kernel subset and kind from timed pilots."""

import pytest
import torch
from torch import nn

from lightning_ttp import api, budget
from lightning_ttp.api import plan_run, predict_run
from lightning_ttp.budget import MIN_SAMPLES, KernelChoice, choose_kernel


def _setup(n=96):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(n, 5)
    y = torch.randint(0, 4, (n,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, x, y, opt


def test_a_generous_budget_keeps_the_exact_kernel_on_every_sample():
    model, x, y, opt = _setup()
    choice = choose_kernel(model, x, y, steps=100, batch_size=16, budget=10,
                           floor_seconds=1e6)
    assert (choice.num_samples, choice.kernel) == (96, "full")
    assert choice.budget_seconds == 1e6 and choice.run_seconds > 0 and choice.predicted_seconds > 0


def test_an_impossible_budget_falls_back_to_the_trace_kernel_on_the_smallest_subset():
    model, x, y, opt = _setup()
    choice = choose_kernel(model, x, y, steps=1, batch_size=1, budget=1e-9,
                           floor_seconds=0.0)
    assert (choice.num_samples, choice.kernel) == (MIN_SAMPLES, "trace")
    assert "exceed its budget" in choice.reason


def test_budget_is_validated():
    model, x, y, _ = _setup()
    with pytest.raises(ValueError, match="budget"):
        choose_kernel(model, x, y, steps=1, batch_size=1, budget=0)


def test_predict_run_uses_the_choice_on_a_seeded_random_part_of_the_subset(monkeypatch):
    model, x, y, opt = _setup()
    plan = plan_run((x, y), opt, 20)
    chosen = KernelChoice(40, "full", 0.1, 0.05, 1.0, 0.01, "exact kernel on 40 samples (test)")
    monkeypatch.setattr(api, "choose_kernel", lambda *a, **k: chosen)
    run = predict_run(model, (x, y), opt, plan, budget=0.05, num_paths=1)
    pred, kernel = run.prediction, run.kernel
    assert kernel.num_samples == 40 and pred.diagnostics["budget"]["num_samples"] == 40
    assert any("cost budget" in w for w in pred.diagnostics.warnings)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:40].sort().values
    assert torch.equal(kernel.targets, y[order])  # a random part, not the first 40 samples
    full = predict_run(model, (x, y), opt, plan, budget=None, num_paths=1)
    assert full.kernel.num_samples == 96 and "budget" not in full.prediction.diagnostics


def test_training_step_timing_leaves_no_gradients_and_keeps_modes():
    model, x, y, _ = _setup()
    model.eval()
    assert budget.time_training_step(model, x, y, "cross_entropy", 16) > 0
    assert all(p.grad is None for p in model.parameters()) and not model.training
