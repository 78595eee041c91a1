"""The pipeline in one call: predict the loss curve and training time of a fine-tuning run.

``predict_training_time`` is the whole pipeline in one call, and the Lightning callback runs the
same steps from a ``Trainer``:

1. :func:`~lightning_ttp.pipeline.plan.plan_run` — the run's plan (steps, batch, per-step lr/momentum);
2. :func:`~lightning_ttp.pipeline.data.sample_subset` — the fixed, seeded kernel subset;
3. :func:`~lightning_ttp.pipeline.estimate.estimate_kernel` — f0 and the empirical NTK at w0 (the
   expensive part);
4. :func:`~lightning_ttp.pipeline.simulate.simulate_plan` — the function-space simulation (seconds);
5. :func:`~lightning_ttp.pipeline.lookahead.look_ahead` — a few real steps on the kernel subset (model,
   optimiser and RNG restored), re-linearised there: the curve that corrects the open loop for
   the feature learning of the run's first steps.

The public names are re-exported by :mod:`lightning_ttp.api`. The pieces are public so that a
caller estimates the kernel once and simulates many "what-if" settings on it
(:func:`~lightning_ttp.pipeline.simulate.what_if`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..dynamics import Loss, OptimizerSpec
from ..kernel.batch import index_batch
from ..kernel.modes import untouched
from ..kernel.shard import Sharding
from .budget import MIN_SAMPLES, choose_kernel
from .data import sample_subset, split_batch
from .estimate import KernelEstimate, estimate_kernel, per_sample_view, standing_for
from .lookahead import look_ahead
from .plan import RunPlan, plan_run
from .prediction import Prediction
from .simulate import Method, simulate_plan

__all__ = ["RunPrediction", "predict_run", "predict_training_time"]

DEFAULT_NUM_SAMPLES = 256
DEFAULT_BUDGET = 1.0  # the prediction may count as many multiply-adds as the run before it shrinks


@dataclass
class RunPrediction:
    """What :func:`predict_run` computed: the prediction, and what a caller needs to simulate
    more on the same kernel (:func:`what_if`) or to re-linearise later
    (:class:`lightning_ttp.pipeline.closed_loop.ClosedLoop`)."""

    prediction: Prediction
    kernel: KernelEstimate
    spec: OptimizerSpec
    inputs: Any
    targets: torch.Tensor
    #: the ``output_fn`` the kernel was estimated with (:func:`lightning_ttp.pipeline.estimate.per_sample_view`)
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
    lookahead: bool = True,
    sharding: Sharding | None = None,
) -> RunPrediction:
    """Estimate the kernel on ``subset`` (one collated batch) and simulate ``plan`` on it.

    The common core of :func:`predict_training_time` and the Lightning callback. With a
    ``budget`` (a multiple of the run's counted cost, default 1) and no ``projection_dim``, the
    exact kernel on the whole subset is kept unless it would count more than that; then the
    subset and kind are chosen to fit (:func:`lightning_ttp.pipeline.budget.choose_kernel`: multiply-adds
    counted from the model's shapes, never timed, so the choice is the same on any machine). The
    choice is in ``prediction.diagnostics["budget"]``; ``budget=None`` uses the whole subset (its
    counts are reported all the same, without a projection: the closed loop's budget uses them).

    With ``lookahead`` (default, when it fits the cost cap on top of the kernel: it is dropped
    before the kernel is shrunk) the open-loop prediction is corrected by a look-ahead of a few
    real optimiser steps on the kernel subset (:func:`lightning_ttp.pipeline.lookahead.look_ahead`; model,
    optimiser and RNG left as they were): its loss curve becomes the open loop's ramped to the
    level the real steps reached, then the continuation re-linearised there; band and
    continuation rejoined to it
    (:meth:`~lightning_ttp.pipeline.prediction.Prediction.rejoined`); what it measured is in
    ``prediction.diagnostics["lookahead"]``, with the open loop's ε-training-times (None: not
    converged within the run).

    With a ``sharding`` (:class:`lightning_ttp.kernel.Sharding`, data-parallel processes) the call is
    a collective: every process passes the same model weights, subset, optimiser and plan; the
    kernel's samples (at fit start and in the look-ahead's re-linearisation) are split across the
    processes, the cost cap counts the kernel's share of one process against one process's share
    of the run, and every process returns the same prediction (equal to one process's on the same
    subset up to float rounding).
    """
    spec = OptimizerSpec.from_optimizer(optimizer)
    inputs, targets = split_batch(subset, output_fn=output_fn, target_fn=target_fn)
    # one row per sample (flattened sequences regrouped), the token loss resolved: every part sees the same
    loss, targets, output_fn, _ = per_sample_view(model, inputs, targets, loss, output_fn)
    choice, kind, available = None, "auto", int(targets.shape[0])
    capped = budget is not None and available > MIN_SAMPLES
    if projection_dim is None:  # counted even without a cap: the closed loop's budget is a count too
        order = torch.randperm(targets.shape[0], generator=torch.Generator().manual_seed(seed))
        order = order.to(targets.device)
        count = functools.partial(choose_kernel, model, index_batch(inputs, order), targets[order], optimizer, plan,
                                  output_fn=output_fn, num_paths=num_paths, continuation=continuation,
                                  processes=1 if sharding is None else sharding.world_size)
        if capped:
            choice = count(budget=budget)
            kind = choice.kernel
        else:
            try:  # the kind the estimate's "auto" uses; a model the counter cannot read keeps its prediction
                choice = count(budget=None, kernel="auto")
            except Exception:  # noqa: BLE001 - the counts only serve the closed loop's budget
                choice = None
        if choice is not None and choice.num_samples < targets.shape[0]:
            keep = order[: choice.num_samples].sort().values
            inputs, targets = index_batch(inputs, keep), targets[keep]
    kernel = estimate_kernel(model, inputs, targets, spec, loss=loss, output_fn=output_fn, kernel=kind,
                             projection_dim=projection_dim, seed=seed, batch_size=plan.effective_batch_size,
                             sharding=sharding)
    subset_kernel, kernel = kernel, standing_for(kernel, plan.dataset_size)
    prediction = simulate_plan(kernel, spec, plan, method=method, num_paths=num_paths, seed=seed,
                               continuation=continuation)
    diverged = prediction.diverged if sharding is None else sharding.rank_zero(prediction.diverged)
    if lookahead and not diverged and (choice is None or choice.lookahead):
        prediction = _looked_ahead(prediction, model, optimizer, spec, inputs, targets, plan, subset_kernel, loss=loss,
                                   output_fn=output_fn, projection_dim=projection_dim, num_paths=num_paths, seed=seed,
                                   sharding=sharding)
    if choice is not None:
        prediction.diagnostics.extra["budget"] = choice.to_dict()
        shrunk = choice.num_samples < available or choice.kernel == "trace" or (lookahead and not choice.lookahead)
        if capped and shrunk:
            prediction.diagnostics.warnings.append(f"cost cap: {choice.reason}.")
    return RunPrediction(prediction, kernel, spec, inputs, targets, output_fn)


def _looked_ahead(prediction: Prediction, model, optimizer, spec, inputs, targets, plan: RunPlan,
                  kernel: KernelEstimate, **options: Any) -> Prediction:
    """The open-loop ``prediction`` corrected by the look-ahead (unchanged, with a note, when the
    run is too short for one or the look-ahead fails: it never stops the prediction)."""
    try:
        ahead = look_ahead(model, optimizer, spec, inputs, targets, plan, kernel, prediction, **options)
    except Exception as err:  # noqa: BLE001 - the open loop stands on its own
        prediction.diagnostics.warnings.append(f"the look-ahead failed ({type(err).__name__}: {err}); the prediction "
                                               "is the open loop's")
        return prediction
    if ahead is None or not np.all(np.isfinite(ahead.loss)):
        return prediction
    corrected = prediction.rejoined(ahead.loss)
    diagnostics = corrected.diagnostics
    diagnostics.extra["lookahead"] = {**ahead.to_dict(), "open_loop_training_time": {
        str(eps): prediction.training_time(eps) if prediction.converged_within_run(eps) else None
        for eps in (0.4, 0.1, 0.01)}}
    diagnostics.seconds = (diagnostics.seconds or 0.0) + ahead.seconds
    return corrected


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
    lookahead: bool = True,
) -> Prediction:
    """Predict the training-loss curve and ε-training-time of fine-tuning ``model``.

    The model is linearised at its current weights w0 (f_t ≈ f0 + J (w_t − w0)); the empirical
    NTK Θ = J Jᵀ (eq. 2) on a seeded subset of up to ``num_samples`` training samples (default
    256) drives the function-space dynamics of the optimiser for ``steps`` optimiser steps
    (eq. 1 in discrete time; see :func:`lightning_ttp.pipeline.simulate.simulate`); a look-ahead of a few
    real optimiser steps on the kernel subset, re-linearised there, corrects it for the first
    steps' feature learning (``lookahead``). The model (weights, buffers such as BatchNorm
    statistics, modes, ``requires_grad``, ``.grad``), the optimiser and the torch/numpy/python
    random streams are left exactly as they were. The Lightning callback runs the same pipeline
    and gives the same prediction for the same run.

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
            (``"epoch"``), with Lightning's semantics (:mod:`lightning_ttp.pipeline.schedules`).
        num_samples: kernel subset size (default 256; cost grows quadratically).
        projection_dim: random projection of the gradients (Section 4) for large models.
        method: see :class:`lightning_ttp.pipeline.simulate.Method`.
        output_fn: ``output_fn(model, batch) -> (N, C)`` logits, for models whose output is not
            ``model(batch[0])`` (tuples, dicts and ``ModelOutput.logits`` are handled without it).
        target_fn: ``target_fn(batch) -> targets`` for batches that are not ``(x, y, ...)``.
        batch_size: overrides the loader's batch size; accumulate: micro-batches per step.
        budget: shrink the kernel (a smaller subset or the trace kernel) only when the exact kernel
            on the whole subset would count more multiply-adds than this multiple of the run
            (default 1, never below ``budget.FLOOR_MACS``; :mod:`lightning_ttp.pipeline.budget`: counted,
            not timed, so the same call gives the same prediction on any machine); ``None``:
            never shrink.
        lookahead: correct the open loop by a look-ahead of a few real steps on the kernel subset
            (:mod:`lightning_ttp.pipeline.lookahead`; the model, optimiser and RNG are left as they were).
    Returns:
        :class:`~lightning_ttp.pipeline.prediction.Prediction` (with its continuation to 2T).
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
                           budget=budget, lookahead=lookahead).prediction


