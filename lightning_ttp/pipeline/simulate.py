"""Simulation of a planned run on a kernel estimate: the seconds-cheap half of a prediction.

- :func:`simulate`: ``steps`` optimiser steps of the linearised model in function space with
  one of the simulators of :mod:`lightning_ttp.dynamics`, chosen through the :class:`Method`
  table; returns a :class:`~lightning_ttp.pipeline.prediction.Prediction`.
- :func:`simulate_plan`: the run of a :class:`~lightning_ttp.pipeline.plan.RunPlan` plus its
  continuation past T (for runs that converge faster than predicted, and for "not converged
  within the run").
- :func:`what_if`: the same kernel under other settings (lr, batch size, momentum, weight decay).

No models and no Lightning here.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from ..dynamics import (
    BatchSampler,
    OptimizerSpec,
    SimulationResult,
    extrapolated_mse_curve,
    kronecker_factor,
    simulate_discrete,
    simulate_minibatch,
    simulate_mse_closed_form,
    simulate_ode,
    simulate_sde,
    stability_report,
    summarize_paths,
)
from ..dynamics.adam import simulate_adam
from .estimate import KernelEstimate
from .plan import RunPlan, check_steps
from .prediction import Diagnostics, Prediction

__all__ = ["WHAT_IF_KEYS", "Method", "simulate", "simulate_plan", "what_if"]

#: The settings a what-if table can vary (one key at a time).
WHAT_IF_KEYS = ("lr", "batch_size", "momentum", "weight_decay")
#: a simulated loss that grows this many times above its initial value diverges (as does a non-finite one)
DIVERGENCE_FACTOR = 1e4


class Method(str, Enum):
    """The simulators. ``AUTO`` = ``DISCRETE`` for full-batch runs, ``MC`` for mini-batches."""

    AUTO = "auto"
    DISCRETE = "discrete"  # the exact linearised optimiser on the expected (full-batch) gradient
    MC = "mc"  # Monte Carlo over mini-batch sequences
    ODE = "ode"  # the paper's eq. (1), deterministic part, LSODA
    SDE = "sde"  # the paper's eq. (1) with mini-batch noise, Euler–Maruyama
    CLOSED_FORM = "closed_form"  # MSE + GD, eq. (4)–(5); Appendix D extrapolation when N0 < N

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"method must be one of {names}, got {value!r}") from None


@dataclass
class _Run:
    """The resolved inputs of one simulation."""

    ke: KernelEstimate
    spec: OptimizerSpec
    lrs: np.ndarray
    batch: int
    n: int
    drop_last: bool
    shuffle: bool
    num_paths: int
    seed: int
    sde_noise: str
    notes: list[str]
    settle_after: int | None = None  # the run's T when a continuation is simulated past it

    @property
    def full_batch(self) -> bool:
        return self.batch >= self.n

    @property
    def args(self) -> tuple:
        ke = self.ke
        return ke.outputs, ke.targets, self.grams, ke.loss, self.spec, self.lrs

    @property
    def grams(self) -> list:
        """The kernel's Grams, each full one that is exactly K ⊗ I_C (a linear probe) as its K
        (found once per kernel: kept in its ``stability_cache`` with the other per-kernel results)."""
        cache = self.ke.stability_cache
        if "compact_grams" not in cache:
            n, c = self.ke.outputs.shape[0], self.ke.num_outputs
            cache["compact_grams"] = [g if (k := kronecker_factor(g, n, c)) is None else k for g in self.ke.grams]
        return cache["compact_grams"]

    @property
    def adam(self) -> bool:
        return self.spec.kind in ("adam", "adamw") and self.ke.adam_blocks is not None


def _adam(run: _Run, mini_batch: bool) -> SimulationResult:
    ke, blocks = run.ke, run.ke.adam_blocks
    assert blocks is not None
    batches, paths = None, 1
    if mini_batch:
        sampler = BatchSampler(ke.num_samples, run.batch, run.num_paths, n_total=run.n, drop_last=run.drop_last,
                               shuffle=run.shuffle, seed=run.seed, device=blocks["grams"][0].device)
        batches, paths = sampler.batch, run.num_paths
    return simulate_adam(ke.outputs, ke.targets, blocks["grams"], blocks["group"], blocks["sizes"], blocks["rms"],
                         ke.loss, run.spec, run.lrs, jvp_w0=ke.jvp_w0, batches=batches, num_paths=paths,
                         settle_after=run.settle_after)


def _discrete(run: _Run) -> SimulationResult:
    if run.adam:
        return _adam(run, mini_batch=False)
    if not run.full_batch:
        run.notes.append("method='discrete' with mini-batches simulates the expected (full-batch) gradient; "
                         "use 'mc' for SGD noise")
    return simulate_discrete(*run.args, jvp_w0=run.ke.jvp_w0, settle_after=run.settle_after)


def _mc(run: _Run) -> SimulationResult:
    if run.adam:
        return _adam(run, mini_batch=True)
    return simulate_minibatch(*run.args, batch_size=run.batch, n_total=run.n, drop_last=run.drop_last,
                              shuffle=run.shuffle, num_paths=run.num_paths, seed=run.seed, jvp_w0=run.ke.jvp_w0,
                              settle_after=run.settle_after)


def _ode(run: _Run) -> SimulationResult:
    return simulate_ode(*run.args, jvp_w0=run.ke.jvp_w0)


def _sde(run: _Run) -> SimulationResult:
    return simulate_sde(*run.args, batch_size=run.batch, n_total=run.n, num_paths=run.num_paths, seed=run.seed,
                        noise=run.sde_noise, jvp_w0=run.ke.jvp_w0)


def _closed_form(run: _Run) -> SimulationResult:
    ke, spec, lrs = run.ke, run.spec, run.lrs
    if ke.loss.name != "mse":
        raise ValueError("method='closed_form' needs the MSE loss (eq. 4-5); use 'discrete' or 'ode'")
    if not run.full_batch:
        run.notes.append("closed_form ignores mini-batch noise")
    res = simulate_mse_closed_form(ke.outputs, ke.targets, ke.grams, spec, lrs)
    if run.n <= ke.num_samples:
        return res
    # Appendix D: the kernel covers N0 < N samples; extrapolate its spectrum to N.
    factors = np.array([g.effective_lr_factor(spec.kind) for g in spec.groups])
    eff = lrs * factors[None, :]
    ref = eff[int(np.argmax(eff.sum(1)))]
    j = int(np.argmax(ref))
    theta = sum(g * (ref[i] / ref[j]) for i, g in enumerate(ke.grams))
    curve = extrapolated_mse_curve(ke.outputs, ke.targets, theta, eff[:, j], run.n)
    run.notes.append(f"closed_form: spectrum extrapolated from {ke.num_samples} to {run.n} samples "
                     "(Appendix D, alpha=0.15)")
    return SimulationResult(curve[None], None, res.final_outputs, None)


_SIMULATORS: dict[Method, Callable[[_Run], SimulationResult]] = {
    Method.DISCRETE: _discrete,
    Method.MC: _mc,
    Method.ODE: _ode,
    Method.SDE: _sde,
    Method.CLOSED_FORM: _closed_form,
}


def simulate(
    kernel_estimate: KernelEstimate,
    spec: OptimizerSpec,
    steps: int,
    batch_size: int | None = None,
    *,
    lr_schedule: np.ndarray | None = None,
    method: str | Method = Method.AUTO,
    num_paths: int = 8,
    seed: int = 0,
    dataset_size: int | None = None,
    drop_last: bool = False,
    shuffle: bool = True,
    band: tuple[float, float] = (5.0, 95.0),
    sde_noise: str = "rescaled",
    horizon: int | None = None,
) -> Prediction:
    """Simulate ``steps`` optimiser steps on a kernel estimate (seconds; no model needed).

    Args:
        kernel_estimate: from :func:`lightning_ttp.pipeline.estimate.estimate_kernel`.
        spec: the optimiser (possibly a what-if ``spec.replace(...)``).
        steps: optimiser steps to simulate.
        batch_size: samples per optimiser step (× accumulation × world size); ``None`` or ≥ the
            dataset size means full-batch gradient descent.
        lr_schedule: ``(steps, num_groups)`` or ``(steps,)`` lrs; default: the spec's constant lrs.
        method: a :class:`Method` (or its value).
        dataset_size: N, the training-set size (default: the kernel samples N0). When N0 < N,
            the full-batch gradient is the subset mean and mini-batches are mapped as in
            :mod:`lightning_ttp.dynamics.montecarlo`.
        horizon: the run's own length T ≤ ``steps``: the prediction covers 0..T, the remaining
            simulated steps become its ``continuation``, and the stability diagnostic and its
            warning speak of the T steps of the run (default: ``steps``). The discrete, Monte
            Carlo and Adam simulators stop the continuation once the loss has settled and hold
            its last value (``dynamics.discrete.CurveRecorder``; the step is in
            ``diagnostics.extra["settled_at"]``).
    """
    started = time.perf_counter()
    steps = check_steps(steps)
    horizon = steps if horizon is None else check_steps(horizon)
    if horizon > steps:
        raise ValueError(f"horizon ({horizon}) must be <= steps ({steps})")
    chosen = Method.parse(method)
    ke = kernel_estimate
    n0 = ke.num_samples
    if dataset_size is not None and dataset_size < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    n = max(n0 if dataset_size is None else int(dataset_size), n0)
    b = n if batch_size is None else int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and b > n:
        raise ValueError(f"batch_size {b} > dataset size {n} with drop_last=True: no step would run")
    if spec.kind in ("adam", "adamw") and not ke.preconditioned:
        raise ValueError("an Adam-type optimiser needs a kernel estimated with it (estimate_kernel(..., spec))")
    if len(ke.grams) != spec.num_groups:
        raise ValueError(f"the kernel has {len(ke.grams)} param groups, the optimiser {spec.num_groups}")
    run = _Run(ke, spec, spec.schedule(lr_schedule, steps), b, n, drop_last, shuffle, num_paths, seed,
               sde_noise, list(ke.info.get("notes", [])) + list(spec.warnings),
               settle_after=horizon if horizon < steps else None)
    if chosen is Method.AUTO:
        chosen = Method.DISCRETE if run.full_batch else Method.MC
    res = _SIMULATORS[chosen](run)
    sim_seconds = time.perf_counter() - started
    if res.loss.shape[0] > 1:
        loss, loss_band = summarize_paths(res.loss, band)
    else:
        loss, loss_band = res.loss[0], None
    error = error_band = None
    if res.error is not None:
        error, error_band = summarize_paths(res.error, band) if res.error.shape[0] > 1 else (res.error[0], None)
    stab = stability_report(ke.outputs, ke.targets, ke.grams, ke.loss, spec, run.lrs[:horizon],
                            cache=ke.stability_cache)
    run_loss = loss[: horizon + 1]
    # non-finite, or grown DIVERGENCE_FACTOR-fold above its start: the simulated run diverges
    diverged = not np.all(np.isfinite(run_loss)) or bool(run_loss.max() > DIVERGENCE_FACTOR * max(run_loss[0], 1e-12))
    if diverged:  # one sentence that says what happened and what to change; nothing downstream repeats it
        limit = stab["max_stable_lr"]
        message = (f"the simulated run diverges at this lr (max stable lr ≈ {limit:.3g}, first param group; "
                   f"lower the lr below it for a finite prediction)" if np.isfinite(limit)
                   else "the simulated run diverges at this lr (non-finite loss)")
        message += f": {stab['message']}." if stab["message"] else "."
        run.notes.append(message)
        warnings.warn(message, stacklevel=2)
    elif stab["message"]:
        message = (f"{stab['message']}; the simulation stayed finite (the loss's curvature falls as it trains), but "
                   "the real network is far from its linearisation at this lr: expect it to train at a different "
                   "speed.")
        run.notes.append(message)
        warnings.warn(message, stacklevel=2)
    diagnostics = Diagnostics(
        method=chosen.value, optimizer=spec.name, optimizer_kind=spec.kind, kernel=ke.kernel, kernel_samples=n0,
        num_outputs=ke.num_outputs, dataset_size=n, batch_size=b, full_batch=run.full_batch,
        steps_per_epoch=1 if run.full_batch else (n // b if drop_last else math.ceil(n / b)),
        num_paths=int(res.loss.shape[0]), seed=seed,
        lambda_max=stab["lambda_max"], loss_curvature=stab["loss_curvature"], max_stable_lr=stab["max_stable_lr"],
        rho_max=stab["rho_max"], unstable_steps=stab["unstable_steps"],
        first_unstable_step=stab["first_unstable_step"], simulated_steps=steps,
        kernel_seconds=ke.seconds, simulation_seconds=sim_seconds,
        seconds=ke.seconds + (time.perf_counter() - started), loss=ke.loss.describe(),
        lr_first=run.lrs[0].tolist(), lr_last=run.lrs[horizon - 1].tolist(), warnings=run.notes,
        extra={k: v for k, v in ke.info.items()
               if k in ("num_parameters", "projection_dim", "processes", "idiosyncratic_share")},
    )
    if diverged:
        diagnostics.extra["diverged"] = True
    if res.settled_at is not None:
        diagnostics.extra["settled_at"] = res.settled_at
    prediction = Prediction(np.arange(steps + 1), loss, loss_band, error, error_band, diagnostics)
    return prediction if horizon == steps else prediction.truncated(horizon)


def _extended_schedule(schedule: np.ndarray, steps: int) -> np.ndarray:
    """``schedule`` continued to ``steps`` rows, the last lr held."""
    if steps <= schedule.shape[0]:
        return schedule[:steps]
    return np.concatenate([schedule, np.repeat(schedule[-1:], steps - schedule.shape[0], axis=0)])


def simulate_plan(
    kernel_estimate: KernelEstimate,
    spec: OptimizerSpec,
    plan: RunPlan,
    *,
    method: str | Method = Method.AUTO,
    num_paths: int = 8,
    seed: int = 0,
    continuation: float = 2.0,
) -> Prediction:
    """The run of ``plan`` (steps 0..T), simulated to ``continuation``·T with the last lr held.

    The steps after T become :attr:`~lightning_ttp.pipeline.prediction.Prediction.continuation`; the
    simulators are causal, so steps 0..T equal a T-step simulation. The plan's notes (what it
    had to assume) are added to the diagnostics' warnings.
    """
    if continuation < 1:
        raise ValueError(f"continuation must be >= 1 (a multiple of the run's steps), got {continuation}")
    total = max(plan.steps, int(round(continuation * plan.steps)))
    prediction = simulate(kernel_estimate, spec, total, plan.effective_batch_size,
                          lr_schedule=_extended_schedule(plan.lr_schedule, total), method=method,
                          num_paths=num_paths, seed=seed, dataset_size=plan.dataset_size, drop_last=plan.drop_last,
                          shuffle=plan.shuffle, horizon=plan.steps)
    notes = list(plan.notes) + list(plan.schedule.notes)
    if plan.schedule.momentum_varies:
        notes.append("the schedule varies momentum/β₁ per step; the simulation holds it at its initial value.")
    prediction.diagnostics.warnings = notes + prediction.diagnostics.warnings
    prediction.diagnostics.extra["plan"] = {k: v for k, v in plan.describe().items() if k != "notes"}
    return prediction


def check_what_if(settings: Mapping[str, Any] | None) -> dict[str, list[float]]:
    """Validate ``{"lr": [...], "batch_size": [...], "momentum": [...], "weight_decay": [...]}``."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise TypeError("what_if must be a dict like {'lr': [0.01, 0.1], 'batch_size': [32]}.")
    out: dict[str, list[float]] = {}
    for key, values in settings.items():
        if key not in WHAT_IF_KEYS:
            raise ValueError(f"what_if key {key!r} is not supported; use one of {WHAT_IF_KEYS}.")
        vals = [values] if isinstance(values, (int, float)) else list(values)
        if not vals:
            raise ValueError(f"what_if[{key!r}] is empty; give at least one value.")
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"what_if[{key!r}] must contain finite numbers >= 0, got {v!r}.")
            if key in ("lr", "batch_size") and v <= 0:
                raise ValueError(f"what_if[{key!r}] values must be > 0, got {v!r}.")
            if key == "momentum" and v >= 1:
                raise ValueError(f"what_if['momentum'] values must be in [0, 1), got {v!r}.")
        out[key] = [int(v) if key == "batch_size" else float(v) for v in vals]
    return out


def what_if(
    kernel_estimate: KernelEstimate,
    spec: OptimizerSpec,
    plan: RunPlan,
    settings: Mapping[str, Sequence[float]],
    epsilons: Sequence[float],
    *,
    method: str | Method = Method.AUTO,
    num_paths: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Predicted steps to converge under other settings, one key varied at a time, on the same kernel.

    ``lr`` scales every group and every step of the planned schedule (its shape is kept);
    ``batch_size`` is per micro-batch (× accumulation × world size, as in the plan).
    Returns rows ``{"setting": "lr=0.1", "steps_to_converge": {str(ε): steps or None}, "final_loss": L_T}``.
    """
    rows: list[dict[str, Any]] = []
    base = spec.lrs
    for key, values in check_what_if(settings).items():
        for value in values:
            variant, schedule, batch = spec, plan.lr_schedule, plan.effective_batch_size
            if key == "lr":
                ratio = value / base[0] if base[0] > 0 else 1.0
                variant, schedule = spec.replace(lr=list(base * ratio)), plan.lr_schedule * ratio
            elif key == "batch_size":
                batch = int(value) * plan.accumulate * plan.world_size
            else:
                variant = spec.replace(**{key: value})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a variant's stability note belongs to its row, not the run
                result = simulate(kernel_estimate, variant, plan.steps, batch, lr_schedule=schedule, method=method,
                                  num_paths=num_paths, seed=seed, dataset_size=plan.dataset_size,
                                  drop_last=plan.drop_last, shuffle=plan.shuffle)
            rows.append({
                "setting": f"{key}={value:g}",
                "steps_to_converge": {str(e): result.training_time(e) for e in epsilons},
                "final_loss": float(result.loss[-1]),
                "stable": result.diagnostics.first_unstable_step is None,
            })
    return rows
