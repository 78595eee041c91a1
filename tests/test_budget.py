"""The cost cap chooses the kernel subset and kind from counted multiply-adds, never from timings."""

import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ttp import predict_training_time
from lightning_ttp.api import plan_run, predict_run
from lightning_ttp.kernel import count_ntk_macs, empirical_ntk, estimate_ntk_cost
from lightning_ttp.pipeline import budget
from lightning_ttp.pipeline import predict as api
from lightning_ttp.pipeline.budget import MIN_SAMPLES, KernelChoice, choose_kernel

pytestmark = pytest.mark.usefixtures("_one_thread")


def _setup(n=96, width=32, classes=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, classes))
    x = torch.randn(n, 5)
    y = torch.randint(0, classes, (n,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, x, y, opt


def test_the_default_keeps_the_exact_kernel_on_every_sample_and_reports_each_count():
    model, x, y, opt = _setup()
    choice = choose_kernel(model, x, y, opt, plan_run((x, y), opt, 100, batch_size=16), budget=1.0)
    assert (choice.num_samples, choice.kernel) == (96, "full")
    parts = choice.components
    assert set(parts) == {"passes", "contraction", "extras", "simulation", "lookahead"} and choice.lookahead
    assert parts["passes"] > 0 and parts["contraction"] > 0 and parts["simulation"] > 0
    assert choice.predicted_macs == pytest.approx(sum(parts.values()))
    assert choice.budget_macs == budget.FLOOR_MACS and choice.run_macs > 0


def test_the_lookahead_gives_way_before_the_kernel_shrinks():
    model, x, y, opt = _setup(n=256, width=64, classes=8)
    plan = plan_run((x, y), opt, 200, batch_size=32)
    free = choose_kernel(model, x, y, opt, plan, budget=1e-9, floor_macs=1e15)  # everything under the floor
    kernel_only = free.predicted_macs - free.components["lookahead"]
    # room for the exact kernel on every sample, not for the look-ahead on top of it
    tight = choose_kernel(model, x, y, opt, plan, budget=1e-9, floor_macs=kernel_only * 1.01)
    assert (tight.num_samples, tight.kernel, tight.lookahead) == (256, "full", False)
    assert "no look-ahead" in tight.reason and "lookahead" not in tight.components
    # a generous cap, but a look-ahead that would count more than LOOKAHEAD_SHARE of this short run
    short = choose_kernel(model, x, y, opt, plan, budget=1000.0, floor_macs=0.0)
    assert free.components["lookahead"] > budget.LOOKAHEAD_SHARE * short.run_macs
    assert (short.num_samples, short.kernel, short.lookahead) == (256, "full", False)


def test_an_impossible_cap_falls_back_to_the_trace_kernel_on_the_smallest_subset():
    model, x, y, opt = _setup()
    choice = choose_kernel(model, x, y, opt, plan_run((x, y), opt, 1, batch_size=1), budget=1e-9, floor_macs=0.0)
    assert (choice.num_samples, choice.kernel) == (MIN_SAMPLES, "trace")
    assert "over the cap" in choice.reason


def test_budget_is_validated():
    model, x, y, opt = _setup()
    with pytest.raises(ValueError, match="budget"):
        choose_kernel(model, x, y, opt, plan_run((x, y), opt, 1), budget=0)


def test_the_subset_shrinks_only_when_the_exact_kernel_counts_more_than_the_cap_and_then_fits_it():
    model, x, y, opt = _setup(n=256, width=64, classes=8)
    plan = plan_run((x, y), opt, 200, batch_size=32)
    full = choose_kernel(model, x, y, opt, plan, budget=100.0, floor_macs=0.0)
    assert full.predicted_macs <= 100 * full.run_macs and (full.num_samples, full.kernel) == (256, "full")
    floor = choose_kernel(model, x, y, opt, plan, budget=1e-9, floor_macs=full.predicted_macs)
    assert (floor.num_samples, floor.kernel) == (256, "full")  # the cap is max(budget × run, floor)
    kernel_only = full.predicted_macs - full.components.get("lookahead", 0.0)
    small = choose_kernel(model, x, y, opt, plan, budget=kernel_only / 3 / full.run_macs, floor_macs=0.0)
    assert small.num_samples < 256 or small.kernel == "trace"
    assert small.predicted_macs <= small.budget_macs


def test_the_choice_does_not_depend_on_the_machine_load(monkeypatch):
    # every timer the package could read is made to run wild: the choice and the prediction stay identical
    model, x, y, opt = _setup(n=200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    first = predict_training_time(model, loader, opt, 40, num_samples=160, budget=0.05, num_paths=2)
    calls = iter(range(10**9))
    monkeypatch.setattr(time, "perf_counter", lambda: next(calls) * 7.3)
    monkeypatch.setattr(time, "time", lambda: next(calls) * 11.1)
    second = predict_training_time(model, loader, opt, 40, num_samples=160, budget=0.05, num_paths=2)
    assert first.diagnostics["budget"]["num_samples"] == second.diagnostics["budget"]["num_samples"]
    assert first.diagnostics["budget"]["kernel"] == second.diagnostics["budget"]["kernel"]
    assert first.loss.tobytes() == second.loss.tobytes()


def test_the_counts_match_independent_references():
    # 3F against FlopCounterMode's count of a training step (forward + backward: 2F to 3F), and
    # the engine's contraction count against the count estimate_ntk_cost reports for the same kernel
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 64, 6))
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 6, (64,))
    forward = budget.forward_macs(model, x)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    model.zero_grad()
    step = counter.get_total_flops() / 2 / 8  # the first layer's backward needs no input gradient: < 3F
    assert 2 * forward <= step <= 3 * forward
    count = count_ntk_macs(model, x, num_samples=64)
    cost = estimate_ntk_cost(model, x, num_samples=64)
    assert count.contraction_macs == cost.contraction_flops and count.num_outputs == 6
    assert count.fallback_parameters == 0 and empirical_ntk(model, x[:4]).grams[0].shape == (24, 24)


def _batchnorm_setup(n=48, classes=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, classes))
    return model, torch.randn(n, 5), torch.randint(0, classes, (n,))


def test_a_kernel_on_batch_statistics_is_counted_as_one_backward_of_the_batch_per_output():
    """BatchNorm in train mode: SGD's fit-start kernel and every optimiser's re-linearisations take one
    backward of the whole subset per output row, N·F·(1 + 2NC), and the dense Gram (NC)²·P."""
    model, x, y = _batchnorm_setup()
    plain = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    forward, c, p = budget.forward_macs(model, x), 3, sum(q.numel() for q in model.parameters())
    expected = {"passes": budget.WEIGHTS["batch_statistics"] * 48 * forward * (1 + 2 * 48 * c),
                "contraction": budget.WEIGHTS["contraction"] * (48 * c) ** 2 * p}
    assert budget.batch_statistics_macs(48, c, forward, p) == pytest.approx(expected)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    choice = choose_kernel(model, x, y, sgd, plan_run((x, y), sgd, 50, batch_size=16), budget=None)
    assert choice.components["passes"] == pytest.approx(expected["passes"])
    assert choice.relinearisation_macs == pytest.approx(
        expected["passes"] + expected["contraction"] + choice.components["extras"])
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    choice = choose_kernel(model, x, y, adam, plan_run((x, y), adam, 50, batch_size=16), budget=None)
    assert choice.components["passes"] < expected["passes"] / 10  # Adam's fit-start kernel: eval mode
    assert choice.relinearisation_macs > expected["passes"]  # its re-linearisations: batch statistics
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1)
    choice = choose_kernel(plain, x, y, sgd, plan_run((x, y), sgd, 50, batch_size=16), budget=None)
    parts = choice.components
    assert choice.relinearisation_macs == pytest.approx(parts["passes"] + parts["contraction"] + parts["extras"])


def test_predict_run_uses_the_choice_on_a_seeded_random_part_of_the_subset(monkeypatch):
    model, x, y, opt = _setup()
    plan = plan_run((x, y), opt, 20)
    chosen = KernelChoice(40, "full", 0.1, 0.05, 1.0, "exact kernel on 40 samples (test)")
    monkeypatch.setattr(api, "choose_kernel", lambda *a, **k: chosen)
    run = predict_run(model, (x, y), opt, plan, budget=0.05, num_paths=1)
    pred, kernel = run.prediction, run.kernel
    assert kernel.num_samples == 40 and pred.diagnostics["budget"]["num_samples"] == 40
    assert any("cost cap" in w for w in pred.diagnostics.warnings)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:40].sort().values
    assert torch.equal(kernel.targets, y[order])  # a random part, not the first 40 samples
    monkeypatch.undo()
    full = predict_run(model, (x, y), opt, plan, budget=None, num_paths=1)
    counted = full.prediction.diagnostics["budget"]  # no cap, but the counts for the closed loop's budget
    assert full.kernel.num_samples == 96 and counted["num_samples"] == 96 and "no cost cap" in counted["reason"]
    assert counted["budget_macs"] == float("inf") and counted["predicted_macs"] > 0
    assert not any("cost cap" in w for w in full.prediction.diagnostics.warnings)


def test_the_uncapped_counts_describe_the_kernel_the_estimate_uses():
    # N·C above FULL_KERNEL_MAX: "auto" estimates the trace kernel, and the counts are the trace kernel's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 50))
    x, y = torch.randn(64, 5), torch.randint(0, 50, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = predict_run(model, (x, y), opt, plan_run((x, y), opt, 10), budget=None, num_paths=1, lookahead=False)
    assert run.prediction.diagnostics.kernel == "trace" == run.prediction.diagnostics["budget"]["kernel"]


def test_the_count_leaves_the_model_the_optimiser_and_the_rng_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.BatchNorm1d(32), nn.Dropout(0.2), nn.Linear(32, 4))
    x, y = torch.randn(96, 5), torch.randint(0, 4, (96,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # a momentum buffer to keep
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    choose_kernel(model, x, y, opt, plan_run((x, y), opt, 50, batch_size=16), budget=1e-9, floor_macs=0.0)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is not advanced
    assert model.training
    for key, value in model.state_dict().items():  # BatchNorm's running statistics included
        assert torch.equal(value, state[key]), key
    for p, b0, g0 in zip(model.parameters(), buffers, grads, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], b0) and torch.equal(p.grad, g0)
