"""A fit-start look-ahead against feature learning: a few real steps before step 0.

The open loop trusts the linearisation at w0 for the whole run; an all-layer fine-tune moves its
features and its kernel (the fresh head's first gradients reshape the features; at a high lr the
loss spikes and the kernel collapses), and the real run leaves its linearisation. Before the first
step of the run, :func:`look_ahead`

1. trains the model for k = ``lookahead_steps(T)`` steps with the user's own optimiser (its class,
   param groups, state and the plan's first lrs) on batches of the kernel subset (the plan's batch
   size, or the whole subset for a full-batch run), in train mode as training runs, dropout and
   the batches drawn from ``seed``;
2. re-linearises there with the closed loop's machinery
   (:func:`lightning_ttp.pipeline.closed_loop.relinearised_prediction`): the kernel Θ^{(k)} at w_k on the same
   subset, the real outputs f_k, the optimiser's momentum or Adam moments carried into function
   space, and the remaining steps k..T simulated from f_k (Monte Carlo mini-batch paths as the
   open loop's): S(τ), τ = 0..T−k, S(0) the real network's loss on the subset at w_k;
3. runs the same k batches and the same Monte Carlo batches after them through the
   *linearised* model at w0 (the control C: what the open loop's simulation gives on exactly
   the look-ahead's batches), so that S/C measures the nonlinearity alone, free of the batches'
   noise: L̂(t) = P(t)·(1 + (S(0)/C(k) − 1)·t/k) for t ≤ k (the level ratio the real steps
   reached, ramped in) and L̂(k + τ) = P(k + τ)·S(τ)/C(k + τ) after, P the open loop's curve;
4. leaves everything as it was: parameters, buffers (BatchNorm's running statistics), ``.grad``,
   the optimiser's state and param groups, module modes and the RNG streams are restored bit
   for bit (:func:`_restored`, from :mod:`lightning_ttp.kernel.modes`).

The prediction's curve becomes L̂, its band and continuation rejoined to it
(:meth:`lightning_ttp.pipeline.prediction.Prediction.rejoined`). For a model that is linear in its
parameters and an SGD-type optimiser the real steps are the linearised ones, S = C and L̂ = P
exactly, whatever the batches (Adam's continuation holds its second moment, its control does
not: there L̂ ≈ P). Pure torch, numpy and scipy: no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..dynamics import Loss, OptimizerSpec, get_loss, simulate_discrete
from ..dynamics.adam import simulate_adam
from ..dynamics.batch import Batch
from ..kernel.batch import index_batch
from ..kernel.modes import preserve_optimizer, preserve_parameter_values, untouched
from ..kernel.shard import Sharding
from .closed_loop import continuation_batches, relinearised_prediction
from .estimate import KernelEstimate
from .outputs import model_outputs
from .plan import RunPlan
from .prediction import Prediction

__all__ = ["LOOKAHEAD_FRACTION", "LookAhead", "joined_curve", "look_ahead", "lookahead_steps"]

#: the look-ahead's share of the run's steps (at least ``MIN_STEPS``, at most ``MAX_STEPS``)
LOOKAHEAD_FRACTION = 0.05
MIN_STEPS, MAX_STEPS = 3, 100


@dataclass
class LookAhead:
    """What the look-ahead measured.

    Attributes:
        steps: k, the real optimiser steps taken on the kernel subset.
        level_ratio: S(0)/C(k), the real network's loss on the subset after the k steps against
            the linearised model's after the same batches (< 1: the real steps went further).
        scale, alignment, alignment_start: the kernel drift at k
            (:class:`lightning_ttp.pipeline.closed_loop.KernelDrift`).
        losses: the k training losses of the look-ahead's batches.
        loss: the joined curve L̂ at steps 0..T (:func:`joined_curve`).
        seconds: wall clock of the look-ahead (steps, kernel, simulation).
    """

    steps: int
    level_ratio: float
    scale: float
    alignment: float
    alignment_start: float
    losses: list[float]
    loss: np.ndarray
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "level_ratio": self.level_ratio, "scale": self.scale, "alignment": self.alignment,
                "alignment_start": self.alignment_start, "seconds": self.seconds}


def lookahead_steps(total_steps: int) -> int:
    """k = round(``LOOKAHEAD_FRACTION`` · T), clipped to [MIN_STEPS, MAX_STEPS] and below T/2 (0: too short)."""
    k = int(np.clip(round(LOOKAHEAD_FRACTION * total_steps), MIN_STEPS, MAX_STEPS))
    return k if 2 * k <= total_steps else 0


@contextmanager
def _restored(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Everything the look-ahead's training touches, restored bit for bit on exit (also on error):
    the model's parameter values, buffers, modes, ``requires_grad``/``.grad``, the RNG streams
    (:func:`lightning_ttp.kernel.modes.untouched`) and the optimiser's state and param groups."""
    with untouched(model), preserve_parameter_values(model), preserve_optimizer(optimizer):
        yield


def _batches(n: int, plan: RunPlan, steps: int, seed: int) -> list[torch.Tensor]:
    """The look-ahead's k batches of subset indices: the whole subset for a full-batch run, else
    consecutive chunks of the plan's batch size from seeded permutations (in order for an
    unshuffled loader)."""
    if plan.effective_batch_size >= int(plan.dataset_size or n):
        return [torch.arange(n)] * steps
    batch = min(n, plan.effective_batch_size)
    generator = torch.Generator().manual_seed(seed)
    order, position, out = None, n, []
    for _ in range(steps):
        if position + batch > n:
            order = torch.randperm(n, generator=generator) if plan.shuffle else torch.arange(n)
            position = 0
        out.append(order[position:position + batch].sort().values)
        position += batch
    return out


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: Any, targets: torch.Tensor,
           loss: Loss, plan: RunPlan, batches: list[torch.Tensor], output_fn: Callable | None) -> list[float]:
    """One real optimiser step per batch (the plan's lrs, train mode); returns the batch losses."""
    trainable = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    losses = []
    model.train()
    for t, idx in enumerate(batches):
        for group, lr in zip(optimizer.param_groups, np.atleast_1d(plan.lr_schedule[t]), strict=True):
            group["lr"] = float(lr)
        idx = idx.to(targets.device)
        x, y = index_batch(inputs, idx), targets[idx]
        out = model_outputs(model, x, output_fn)
        value = loss.value(out.double(), loss.prepare_targets(y.to(out.device), out.shape[1]))
        grads = torch.autograd.grad(value, trainable, allow_unused=True)
        for p, g in zip(trainable, grads, strict=True):
            p.grad = None if g is None else g.to(p.dtype)
        optimizer.step()
        losses.append(float(value.detach()))
    for p in trainable:
        p.grad = None
    return losses


def _control(start: KernelEstimate, spec: OptimizerSpec, plan: RunPlan, batches: list[torch.Tensor],
             num_paths: int, seed: int) -> np.ndarray:
    """C at steps 0..T: the linearised model at w0 on the look-ahead's k batches, then on the
    Monte Carlo batches the re-linearised continuation draws
    (:func:`~lightning_ttp.pipeline.closed_loop.continuation_batches` at step k), mean over paths."""
    n0, k = start.num_samples, len(batches)
    n = max(n0, int(plan.dataset_size or n0))
    device = start.grams[0].device
    later, paths = continuation_batches(n0, plan.effective_batch_size, n, num_paths, seed=seed, step=k,
                                        device=device)
    early = [Batch(torch.full((paths, idx.numel()), 1.0 / idx.numel(), dtype=start.grams[0].dtype, device=device),
                   idx.to(device).expand(paths, -1).contiguous()) for idx in batches]

    def batch(t: int) -> Batch | None:
        return early[t] if t < k else (None if later is None else later(t - k))

    lrs = spec.schedule(plan.lr_schedule, plan.steps, steps_name="steps")
    select = None if plan.effective_batch_size >= n else batch  # full batch: the expected gradient throughout
    if spec.kind in ("adam", "adamw") and start.adam_blocks is not None:
        blocks = start.adam_blocks
        res = simulate_adam(start.outputs, start.targets, blocks["grams"], blocks["group"], blocks["sizes"],
                            blocks["rms"], start.loss, spec, lrs, jvp_w0=start.jvp_w0, batches=select,
                            num_paths=paths)
    else:
        res = simulate_discrete(start.outputs, start.targets, start.grams, start.loss, spec, lrs,
                                jvp_w0=start.jvp_w0, batches=select, num_paths=paths)
    return res.loss.mean(axis=0)


def joined_curve(open_loop: np.ndarray, continuation: np.ndarray, control: np.ndarray, step: int) -> np.ndarray:
    """L̂ at steps 0..T from the open loop's P (0..T), the look-ahead's continuation S (steps k..T)
    and the linearised control C (0..T) on the same batches (module docstring, 3.)."""
    p = np.asarray(open_loop, dtype=np.float64)
    cont = np.asarray(continuation, dtype=np.float64)
    ctrl = np.asarray(control, dtype=np.float64)
    if cont.size != p.size - step or ctrl.size != p.size:
        raise ValueError(f"got a continuation of {cont.size} and a control of {ctrl.size} steps for a curve of "
                         f"{p.size} (continuation: steps {step}..T)")
    ratio = cont / np.where(ctrl[step:] > 0, ctrl[step:], 1.0)
    ramp = 1.0 + (ratio[0] - 1.0) * np.arange(step + 1) / step
    return np.concatenate([p[: step + 1] * ramp, p[step + 1:] * ratio[1:]])


def look_ahead(model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: OptimizerSpec, inputs: Any,
               targets: torch.Tensor, plan: RunPlan, start: KernelEstimate, prediction: Prediction, *,
               loss: str | Loss | Callable = "cross_entropy", output_fn: Callable | None = None,
               projection_dim: int | None = None, num_paths: int = 8, seed: int = 0,
               steps: int | None = None, extrapolate: bool = True,
               sharding: Sharding | None = None) -> LookAhead | None:
    """Look k steps ahead on the kernel subset and join the re-linearised continuation to the open
    loop's ``prediction`` (module docstring). ``None`` when the run is too short (T < 2·MIN_STEPS).

    With a ``sharding`` (data-parallel processes, a collective) every process takes the same k steps
    on the module itself (not through a DDP wrapper: no gradient is all-reduced), from the same
    weights, optimiser state, batches and seed, and the re-linearisation at w_k splits the subset's
    samples across them (:class:`lightning_ttp.kernel.Sharding`)."""
    started = time.perf_counter()
    k = lookahead_steps(plan.steps) if steps is None else int(steps)
    if k < 1 or plan.steps <= k:
        return None
    loss_obj = get_loss(loss)
    batches = _batches(int(targets.shape[0]), plan, k, seed)
    with _restored(model, optimizer):
        torch.manual_seed(seed)  # dropout and the like draw from the seed, not from the caller's stream
        losses = _train(model, optimizer, inputs, targets, loss_obj, plan, batches, output_fn)
        live = relinearised_prediction(model, optimizer, spec, inputs, targets, losses, plan.steps, start,
                                       lr_schedule=plan.lr_schedule, loss=loss, batch_size=plan.effective_batch_size,
                                       dataset_size=plan.dataset_size, output_fn=output_fn,
                                       projection_dim=projection_dim, num_paths=num_paths, blend=False,
                                       calibrate=False, batch_statistics=False, extrapolate_drift=extrapolate,
                                       stand_for_dataset=False,
                                       seed=seed, sharding=sharding)
    control = _control(start, spec, plan, batches, num_paths, seed)
    curve = joined_curve(prediction.loss, live.continuation, control, k)
    drift = live.drift
    return LookAhead(k, float(live.continuation[0] / control[k]) if control[k] > 0 else 1.0, float(drift.scale),
                     float(drift.alignment), float(drift.alignment_start), losses, curve,
                     time.perf_counter() - started)
