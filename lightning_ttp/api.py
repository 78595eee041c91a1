"""The public entry point: predict the loss curve and training time of a fine-tuning run.

``predict_training_time`` is the whole pipeline in one call, and the Lightning callback runs the
same steps from a ``Trainer``:

1. :func:`~lightning_ttp.plan.plan_run` — the run's plan (steps, batch, per-step lr/momentum);
2. :func:`~lightning_ttp.data.sample_subset` — the fixed, seeded kernel subset;
3. :func:`~lightning_ttp.estimate.estimate_kernel` — f0 and the empirical NTK at w0 (the
   expensive part);
4. :func:`~lightning_ttp.simulate.simulate_plan` — the function-space simulation (seconds).

The pieces are public so that a caller estimates the kernel once and simulates many "what-if"
settings on it (:func:`~lightning_ttp.simulate.what_if`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._modes import untouched
from .budget import MIN_SAMPLES, choose_kernel
from .data import sample_subset, split_batch
from .dynamics import Loss, OptimizerSpec
from .estimate import KernelEstimate, estimate_kernel, per_sample_view
from .kernel.batch import index_batch
from .plan import RunPlan, plan_run
from .prediction import Prediction
from .schedules import lr_schedule_from_scheduler
from .simulate import Method, simulate, simulate_plan, what_if

__all__ = [
    "KernelEstimate",
    "Method",
    "RunPlan",
    "RunPrediction",
    "estimate_kernel",
    "lr_schedule_from_scheduler",
    "plan_run",
    "predict_run",
    "predict_training_time",
    "simulate",
    "simulate_plan",
    "what_if",
]

DEFAULT_NUM_SAMPLES = 256
DEFAULT_BUDGET = 0.05  # the prediction's share of the run's predicted cost


@dataclass
class RunPrediction:
    """What :func:`predict_run` computed: the prediction, and what a caller needs to simulate
    more on the same kernel (:func:`what_if`) or to re-linearise later
    (:class:`lightning_ttp.relinearise.ClosedLoop`)."""

    prediction: Prediction
    kernel: KernelEstimate
    spec: OptimizerSpec
    inputs: Any
    targets: torch.Tensor
    #: the ``output_fn`` the kernel was estimated with (:func:`lightning_ttp.estimate.per_sample_view`)
    output_fn: Callable | None = None


def predict_run(
    model: torch.nn.Module,
    subset: Any,
    optimizer: torch.optim.Optimizer,
    plan: RunPlan,
    *,
    loss: str | Loss | Callable = "cross_entropy",
    output_fn: Callable | None = None,
    target_fn: Callable | None = None,
    projection_dim: int | None = None,
    method: str | Method = Method.AUTO,
    num_paths: int = 8,
    seed: int = 0,
    continuation: float = 2.0,
    budget: float | None = DEFAULT_BUDGET,
) -> RunPrediction:
    """Estimate the kernel on ``subset`` (one collated batch) and simulate ``plan`` on it.

    The common core of :func:`predict_training_time` and the Lightning callback. With a
    ``budget`` (a share of the run's predicted cost, default 5 %) and no ``projection_dim``,
    the kernel subset and kind are chosen to fit it (:func:`lightning_ttp.budget.choose_kernel`;
    the choice is in ``prediction.diagnostics["budget"]``); ``budget=None`` uses the whole
    subset.
    """
    spec = OptimizerSpec.from_optimizer(optimizer)
    inputs, targets = split_batch(subset, output_fn=output_fn, target_fn=target_fn)
    # one row per sample (flattened sequences regrouped), the token loss resolved: every part sees the same
    loss, targets, output_fn, _ = per_sample_view(model, inputs, targets, loss, output_fn)
    choice, kind, available = None, "auto", int(targets.shape[0])
    if budget is not None and projection_dim is None and targets.shape[0] > MIN_SAMPLES:
        order = torch.randperm(targets.shape[0], generator=torch.Generator().manual_seed(seed))
        order = order.to(targets.device)
        choice = choose_kernel(model, index_batch(inputs, order), targets[order], optimizer, plan, budget=budget,
                               loss=loss, output_fn=output_fn, method=method, num_paths=num_paths, seed=seed,
                               continuation=continuation)
        if choice.num_samples < targets.shape[0]:
            keep = order[: choice.num_samples].sort().values
            inputs, targets = index_batch(inputs, keep), targets[keep]
        kind = choice.kernel
    kernel = estimate_kernel(model, inputs, targets, spec, loss=loss, output_fn=output_fn, kernel=kind,
                             projection_dim=projection_dim, seed=seed, batch_size=plan.effective_batch_size)
    prediction = simulate_plan(kernel, spec, plan, method=method, num_paths=num_paths, seed=seed,
                               continuation=continuation)
    if choice is not None:
        prediction.diagnostics.extra["budget"] = choice.to_dict()
        if choice.num_samples < available or choice.kernel == "trace":
            prediction.diagnostics.warnings.append(f"cost budget: {choice.reason}.")
    return RunPrediction(prediction, kernel, spec, inputs, targets, output_fn)


def predict_training_time(
    model: torch.nn.Module,
    data: Any,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    loss: str | Loss | Callable = "cross_entropy",
    lr_scheduler: Any = None,
    scheduler_interval: str = "step",
    scheduler_frequency: int = 1,
    num_samples: int | None = None,
    projection_dim: int | None = None,
    method: str | Method = Method.AUTO,
    num_paths: int = 8,
    seed: int = 0,
    output_fn: Callable | None = None,
    target_fn: Callable | None = None,
    batch_size: int | None = None,
    accumulate: int = 1,
    budget: float | None = DEFAULT_BUDGET,
) -> Prediction:
    """Predict the training-loss curve and ε-training-time of fine-tuning ``model``.

    The model is linearised at its current weights w0 (f_t ≈ f0 + J (w_t − w0)); the empirical
    NTK Θ = J Jᵀ (eq. 2) on a seeded subset of up to ``num_samples`` training samples (default
    256) drives the function-space dynamics of the optimiser for ``steps`` optimiser steps
    (eq. 1 in discrete time; see :func:`lightning_ttp.simulate.simulate`). Nothing is trained;
    the model (weights, buffers such as BatchNorm statistics, modes, ``requires_grad``,
    ``.grad``), the optimiser and the torch/numpy/python random streams are left unchanged. The
    Lightning callback runs the same pipeline and gives the same prediction for the same run.

    Args:
        model: the (pre-trained) network.
        data: a ``DataLoader`` (batch size, ``drop_last``, shuffling read from it) or an
            ``(inputs, targets)`` pair (full-batch GD unless ``batch_size`` is given).
        optimizer: ``torch.optim`` optimiser built on the model's parameters (param groups, lrs,
            momentum, dampening, Nesterov, weight decay read from it).
        steps: number of optimiser steps T.
        loss: "cross_entropy", "mse", "bce_with_logits", a ``torch.nn`` loss or any callable
            ``loss(outputs, targets)`` with mean reduction.
        lr_scheduler: a ``torch.optim.lr_scheduler`` on ``optimizer`` (stepped on a copy)
            every ``scheduler_frequency`` batches (``scheduler_interval="step"``) or epochs
            (``"epoch"``), with Lightning's semantics (:mod:`lightning_ttp.schedules`).
        num_samples: kernel subset size (default 256; cost grows quadratically).
        projection_dim: random projection of the gradients (Section 4) for large models.
        method: see :class:`lightning_ttp.simulate.Method`.
        output_fn: ``output_fn(model, batch) -> (N, C)`` logits, for models whose output is not
            ``model(batch[0])`` (tuples, dicts and ``ModelOutput.logits`` are handled without it).
        target_fn: ``target_fn(batch) -> targets`` for batches that are not ``(x, y, ...)``.
        batch_size: overrides the loader's batch size; accumulate: micro-batches per step.
        budget: keep the kernel's cost within this share of the run's predicted cost (default
            5 %, never below ``budget.FLOOR_SECONDS``) by a smaller subset or the trace kernel; ``None``: no budget.
    Returns:
        :class:`~lightning_ttp.prediction.Prediction` (with its continuation to 2T).
    """
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    plan = plan_run(data, optimizer, steps, lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval,
                    scheduler_frequency=scheduler_frequency, batch_size=batch_size, accumulate=accumulate)
    with untouched(model):  # modes, buffers, requires_grad/.grad and the RNG streams come back as they were
        subset, taken = sample_subset(data, num_samples or DEFAULT_NUM_SAMPLES, seed)
        if plan.dataset_size is None:  # a stream without len(): assume it holds what was read
            plan.dataset_size = taken
        return predict_run(model, subset, optimizer, plan, loss=loss, output_fn=output_fn, target_fn=target_fn,
                           projection_dim=projection_dim, method=method, num_paths=num_paths, seed=seed,
                           budget=budget).prediction


