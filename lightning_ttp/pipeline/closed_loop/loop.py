"""Re-linearised closed loop: re-predict the rest of a run from its current state.

:func:`relinearised_prediction` runs the steps of :mod:`lightning_ttp.pipeline.closed_loop` in
order; :class:`ClosedLoop` calls it at the checkpoints of one run and keeps the drift history.
This module is pure torch/numpy/scipy: no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ...dynamics import OptimizerSpec, simulate_discrete
from ...kernel.shard import Sharding
from ..batch_statistics import kernel_on_batch_statistics
from ..estimate import KernelEstimate, standing_for
from ..refine import default_smoothing_window
from .blend import _blend_weight, _level, _level_along, _smoothed_prefix, _speed, power_law_curve
from .continuation import _stability_capped, continuation_batches
from .drift import drift_multiplier, growth_multiplier, kernel_drift
from .live import LivePrediction
from .state import _current_state

__all__ = ["DEFAULT_FRACTIONS", "ClosedLoop", "checkpoint_steps", "relinearised_prediction"]

DEFAULT_FRACTIONS = (0.02, 0.05, 0.10, 0.20, 0.40)


def relinearised_prediction(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: OptimizerSpec,
    inputs: Any,
    targets: torch.Tensor,
    observed: Sequence[float] | np.ndarray,
    total_steps: int,
    start: KernelEstimate,
    *,
    lr_schedule: np.ndarray | None = None,
    history: Sequence[LivePrediction] = (),
    loss: Any = "cross_entropy",
    batch_size: int | None = None,
    dataset_size: int | None = None,
    smoothing_window: int | None = None,
    reference: np.ndarray | None = None,
    output_fn: Callable | None = None,
    projection_dim: int | None = None,
    extrapolate_drift: bool | str = "growth",
    max_drift: float = 3.0,
    stability_cap: bool = True,
    calibrate: bool = True,
    calibration_prior: float = 1.0,
    num_paths: int = 0,
    batch_statistics: bool | None = None,
    stand_for_dataset: bool = True,
    blend: bool = False,
    blend_min_span: float = 0.1,
    seed: int = 0,
    sharding: Sharding | None = None,
) -> LivePrediction:
    """Re-predict the loss curve of a run at step k = ``len(observed)`` (see :mod:`lightning_ttp.pipeline.closed_loop`).

    Args:
        model, optimizer: the model at w_k and its optimiser (state read, never changed).
        spec: the optimiser as the fit-start prediction read it (``OptimizerSpec.from_optimizer``).
        inputs, targets: the fixed kernel subset (the same samples as ``start``).
        observed: the training losses of steps 0..k−1 as the user's training reports them
            (mini-batch means; NaN where missing).
        total_steps: T.
        start: the fit-start kernel estimate on the same subset (the open loop's), the
            reference of the drift measures.
        lr_schedule: (T, G) or (T,) lrs of the whole run; default: the spec's constant lrs.
        history: the live predictions of earlier calls on this run (the scale trend is
            fitted to their drifts; the last one calibrates the speed, ``calibrate``).
        batch_size, dataset_size: the optimiser-step batch and the training-set size; with
            batch_size < dataset_size and ``num_paths`` ≥ 1 the continuation is the mean of
            ``num_paths`` Monte Carlo mini-batch paths; with ``num_paths=0`` (default) or a full
            batch it follows the expected gradient (weights 1/N0: as accurate on
            ``benchmarks/fidelity.py``, one path of cost).
        batch_statistics: BatchNorm layers in train mode re-linearised on the batch statistics
            of the kernel subset (:func:`batch_statistics_state`; the training dynamics) rather
            than in eval mode; default (None): when the model has such layers, no
            ``projection_dim`` is set and the subset's Jacobian fits ``JACOBIAN_MAX_BYTES``.
        blend: combine the re-linearised curve R with the power law P fitted to the observed
            prefix (:func:`power_law_curve`), L̂ = w R + (1 − w) P after step k, with the weights
            w ∝ 1/e_R, 1 − w ∝ 1/e_P from the mean squared log errors e of the previous call's R
            and P on the smoothed losses observed since that call — only once that span covers
            ``blend_min_span`` · T steps (shorter spans favour the short-range power law); w = 1
            before. Off by default: with the prefix smoothed against ``reference``, through the
            callback on ``benchmarks/defaults.py`` (54 fits) the blend raised the live median error
            at 25 / 50 % of the run from 18 / 11 % to 22 / 13 % (the same 19 % at 10 %).
        stand_for_dataset: with N0 < N the kernel at w_k is made to stand for the whole training set
            (:func:`lightning_ttp.pipeline.estimate.standing_for`: each subset sample's unshared kernel term
            weighted N0/N), as the fit-start prediction's is; ``start`` must then be the corrected
            fit-start estimate too (the drift compares like with like). Off for the look-ahead,
            whose real steps train on the subset itself.
        smoothing_window: for the observed prefix (default: the package's,
            :func:`lightning_ttp.pipeline.refine.default_smoothing_window`).
        reference: the curve expected before the run (steps 0..T at least as far as k: the fit-start
            prediction's loss); the observed prefix and the first call's level are smoothed as their
            difference from it (:func:`~lightning_ttp.pipeline.closed_loop.blend._smoothed_prefix`),
            which keeps the steep first steps where a smoothing of the losses themselves flattens
            them and moves L_0. None: the losses themselves are smoothed.
        projection_dim: random projection of the gradients (large models; cheaper kernels).
        extrapolate_drift: how the kernel is taken to change after k: ``"growth"`` (default)
            multiplies the remaining lrs by m(t) = ĝ(t)/g_k, the growth along the loss gradient
            continued from the last two calls on a log clock
            (:func:`~lightning_ttp.pipeline.closed_loop.drift.growth_multiplier`; on
            ``benchmarks/live_drift.py``, the all-layer fine-tunes of ``benchmarks/defaults.py``
            through the callback, it lowered the live median error at 10 / 25 / 50 % of the run
            from 34 / 27 / 17 % to 29 / 26 / 14 %);
            ``True`` or ``"scale"`` by the kernel trace's log trend
            (:func:`~lightning_ttp.pipeline.closed_loop.drift.drift_multiplier`; it did not
            measurably help on ``benchmarks/fidelity.py``, see docs/prediction.md); ``False``:
            the kernel held at Θ^{(k)}.
        stability_cap: clip the kernel's eigenvalues at the stability limit of the remaining
            lrs (the real network self-stabilises at the edge of stability; its linearisation
            would diverge).
        calibrate: time-warp the continuation by the speed of the real run relative to the
            previous call's curve (:func:`lightning_ttp.pipeline.refine.refine_curve` fitted to
            the losses observed since then); ``calibration_prior`` is the prior sd of log a.
        sharding: split the subset's samples across data-parallel processes for the kernel and
            the buffer images (:class:`lightning_ttp.kernel.Sharding`; a collective: every process
            calls with the same weights, optimiser state and ``observed``, and gets the same result).
    """
    if extrapolate_drift not in (True, False, "scale", "growth"):
        raise ValueError(f"extrapolate_drift must be 'growth', 'scale', True or False, got {extrapolate_drift!r}")
    started = time.perf_counter()
    obs = np.asarray(observed, dtype=np.float64).reshape(-1)
    step = obs.size
    if not 1 <= step < total_steps:
        raise ValueError(f"observed holds {step} losses; re-linearise at 1 <= step < total_steps={total_steps}")
    n0 = start.num_samples
    n = max(n0, int(dataset_size or n0))
    b = n if batch_size is None else int(batch_size)
    full_batch = b >= n
    window = smoothing_window or default_smoothing_window(-(-n // b), full_batch)
    lrs = spec.schedule(lr_schedule, total_steps, steps_name="total_steps")
    kernel_started = time.perf_counter()
    if batch_statistics is None:
        batch_statistics = projection_dim is None and kernel_on_batch_statistics(
            model, start.num_samples, start.num_outputs, sum(p.numel() for g in spec.params or [] for p in g))
    ke, bufs, adam_step = _current_state(model, inputs, targets, spec, optimizer, loss=loss, output_fn=output_fn,
                                         kernel=start.kernel, projection_dim=projection_dim, seed=seed,
                                         reference=start if batch_statistics else None, sharding=sharding)
    if stand_for_dataset:
        ke = standing_for(ke, n)
    kernel_seconds = time.perf_counter() - kernel_started
    residual = ke.loss.per_sample_grad(ke.outputs, ke.loss.prepare_targets(ke.targets, ke.outputs.shape[-1]))
    drift = kernel_drift(start.grams, ke.grams, start.targets, lrs[step], num_outputs=start.num_outputs, step=step,
                         residual=residual)
    if extrapolate_drift == "growth":
        mult = growth_multiplier([*(p.drift for p in history), drift], step, total_steps, max_drift=max_drift)
    elif extrapolate_drift:
        mult = drift_multiplier([*(p.drift for p in history), drift], step, total_steps, max_drift=max_drift)
    else:
        mult = np.ones(total_steps - step)
    remaining = lrs[step:total_steps] * mult[:, None]
    grams, rho = _stability_capped(ke, spec, remaining) if stability_cap else (ke.grams, float("nan"))
    batches, paths = continuation_batches(n0, b, n, num_paths, seed=seed, step=step, device=grams[0].device)
    res = simulate_discrete(ke.outputs, ke.targets, grams, ke.loss, spec, remaining, jvp_w0=ke.jvp_w0,
                            batches=batches, num_paths=paths, initial_buffers=bufs, start_step=adam_step,
                            fixed_preconditioner=spec.kind in ("adam", "adamw"))
    cont = res.loss.mean(axis=0)
    # full batch on the whole data set: the simulated loss at k is the run's loss, no join needed
    previous = history[-1].info.get("relinearised_loss", history[-1].loss) if history else None
    speed = _speed(previous, history[-1].step, obs, calibration_prior) if calibrate and history else None
    warp = 1.0 if speed is None else speed
    if full_batch and n0 >= n:
        level = float(cont[0])
    elif speed is not None:  # every loss since the previous call, along its curve: less noise than a line
        level = _level_along(previous, history[-1].step, obs, warp)
    else:
        level = _level(obs, step, window, reference)
    joined = level * cont / cont[0] if cont[0] > 0 else cont + (level - cont[0])
    if warp != 1.0:
        tau = np.arange(joined.size, dtype=np.float64)
        joined = np.interp(warp * tau, tau, joined)
    t_obs, finite = np.arange(step), np.isfinite(obs)
    prefix = _smoothed_prefix(np.interp(t_obs, t_obs[finite], obs[finite]), window, reference)  # missing interpolated
    relinearised = np.concatenate([prefix, joined])
    curve, weight, power = relinearised.copy(), 1.0, None
    if blend:
        power = power_law_curve(obs, relinearised.size)
        if history and "power_law_loss" in history[-1].info:
            weight = _blend_weight(history[-1], prefix, min_span=blend_min_span * total_steps)
        curve[step:] = weight * relinearised[step:] + (1.0 - weight) * power[step:]
    info = {"smoothing_window": window, "num_paths": paths if batches is not None else 0,
            "relinearised_loss": relinearised, "blend_weight": weight, "adam_step": adam_step,
            "batch_statistics": batch_statistics, "warp": warp, "rho_max": rho}
    if power is not None:
        info["power_law_loss"] = power
    return LivePrediction(step, curve, cont, level, drift, mult, time.perf_counter() - started, kernel_seconds,
                          info)


def checkpoint_steps(total_steps: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, *,
                     min_step: int = 3) -> list[int]:
    """The steps k = round(f·T) at which to re-linearise (distinct, ≥ ``min_step``, < T)."""
    steps = {max(int(round(f * total_steps)), min_step) for f in fractions}
    return sorted(k for k in steps if k < total_steps)


class ClosedLoop:
    """The closed loop of one run: fixed subset and settings, the drift history across calls.

    ``loop.steps`` are the steps at which to call :meth:`update` (default 2, 5, 10, 20, 40 %
    of T). Every keyword of :func:`relinearised_prediction` except ``history`` is accepted.
    """

    def __init__(self, spec: OptimizerSpec, inputs: Any, targets: torch.Tensor, total_steps: int,
                 start: KernelEstimate, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, **options: Any) -> None:
        if "history" in options:
            raise TypeError("ClosedLoop keeps its own drift history; do not pass history")
        self.spec, self.inputs, self.targets, self.total_steps, self.start = spec, inputs, targets, total_steps, start
        self.options = options
        self.steps = checkpoint_steps(total_steps, fractions)
        self.history: list[LivePrediction] = []

    def update(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               observed: Sequence[float] | np.ndarray) -> LivePrediction:
        """Re-predict at step k = ``len(observed)`` and remember the drift."""
        live = relinearised_prediction(model, optimizer, self.spec, self.inputs, self.targets, observed,
                                       self.total_steps, self.start, history=self.history,
                                       **self.options)
        self.history.append(live)
        return live
