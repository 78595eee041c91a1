"""The callback's one door to the prediction engine (:mod:`lightning_ttp.api`).

One kernel estimate per fit; the Trainer's run and every what-if variant are simulations
on that same kernel. Kept apart from the callback so that the Lightning glue does not
depend on the engine's internals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._trainer_state import TrainingPlan

__all__ = ["EngineResult", "predict", "prediction_from_dict"]


@dataclass
class EngineResult:
    """The run's prediction (steps 0..T), the same simulation continued to ``extend``·T
    (used only by the closed-loop refinement, for runs faster than predicted) and the
    what-if rows."""

    prediction: Any
    what_if: list[dict[str, Any]] = field(default_factory=list)
    extended_loss: list[float] | None = None
    extended_band: list[list[float]] | None = None


def _truncate(prediction: Any, steps: int) -> Any:
    """The first ``steps`` optimiser steps of a longer prediction (same simulation)."""
    from ..prediction import Prediction

    keep = slice(0, steps + 1)

    def cut(band: Any) -> Any:
        return None if band is None else (band[0][keep], band[1][keep])

    error = prediction.error
    return Prediction(prediction.steps[keep], prediction.loss[keep], cut(prediction.loss_band),
                      None if error is None else error[keep], cut(prediction.error_band),
                      dict(prediction.diagnostics))


def prediction_from_dict(data: dict[str, Any]) -> Any:
    """``Prediction.from_dict`` of the engine."""
    from ..prediction import Prediction

    return Prediction.from_dict(data)


def _restate_stability(prediction: Any, extended: Any, kernel: Any, spec: Any, lr_schedule: np.ndarray,
                       caught: list[warnings.WarningMessage]) -> None:
    """The stability diagnostics of the run's T steps (not of the 2T continuation): the
    engine's message counts unstable steps, which the continuation would double."""
    from ..dynamics import stability_report

    stab = stability_report(kernel.outputs, kernel.targets, kernel.grams, kernel.loss, spec, lr_schedule,
                            cache=kernel.info.setdefault("stability_cache", {}))
    old_message = extended.diagnostics.get("first_unstable_step") is not None
    for w in caught:  # re-emit everything but the continuation's stability message
        if old_message and str(w.message).startswith("linearisation unreliable"):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if stab["message"]:
        warnings.warn(stab["message"], stacklevel=3)
    diagnostics = prediction.diagnostics
    for key in ("rho_max", "max_stable_lr", "unstable_steps", "first_unstable_step"):
        diagnostics[key] = stab[key]
    notes = [m for m in diagnostics.get("warnings", []) if not str(m).startswith("linearisation unreliable")]
    diagnostics["warnings"] = notes + ([stab["message"]] if stab["message"] else [])
    diagnostics["simulated_steps"] = int(extended.steps[-1])


def predict(
    model: torch.nn.Module,
    inputs: Any,
    targets: Any,
    optimizer: torch.optim.Optimizer,
    plan: TrainingPlan,
    *,
    loss: Any,
    output_fn: Callable[[Any, Any], torch.Tensor] | None,
    projection_dim: int | None,
    method: str,
    num_paths: int,
    seed: int,
    what_if: Mapping[str, Sequence[float]],
    epsilons: Sequence[float],
    extend: float = 2.0,
) -> EngineResult:
    """Estimate the kernel once (:func:`lightning_ttp.api.estimate_kernel`), simulate the
    planned run and every what-if variant on it (:func:`lightning_ttp.api.simulate`)."""
    from ..api import estimate_kernel, simulate
    from ..dynamics import OptimizerSpec

    spec = OptimizerSpec.from_optimizer(optimizer)
    kernel = estimate_kernel(
        model,
        inputs,
        targets,
        spec,
        loss=loss,
        output_fn=output_fn,
        projection_dim=projection_dim,
        seed=seed,
        batch_size=plan.effective_batch_size,
    )
    common = dict(method=method, num_paths=num_paths, seed=seed, dataset_size=plan.dataset_size,
                  drop_last=plan.drop_last, shuffle=plan.shuffle)
    # one simulation to extend·T (the lr held at its last value after T); the run's prediction
    # is its prefix 0..T, identical to a T-step simulation (the simulators are causal)
    long_steps = max(plan.steps, int(round(extend * plan.steps)))
    schedule = plan.lr_schedule
    if long_steps > plan.steps:
        schedule = np.concatenate([schedule, np.repeat(schedule[-1:], long_steps - plan.steps, axis=0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extended = simulate(kernel, spec, long_steps, plan.effective_batch_size, lr_schedule=schedule, **common)
    if long_steps > plan.steps:
        prediction = _truncate(extended, plan.steps)
        _restate_stability(prediction, extended, kernel, spec, plan.lr_schedule, caught)
    else:
        prediction = extended
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    rows: list[dict[str, Any]] = []
    base_lrs = np.asarray([g.lr for g in spec.groups], dtype=np.float64)
    for key, values in what_if.items():
        for value in values:
            variant, schedule, batch = spec, plan.lr_schedule, plan.effective_batch_size
            if key == "lr":
                # scale every group and every step so the schedule's shape is kept
                ratio = value / base_lrs[0] if base_lrs[0] > 0 else 1.0
                variant = spec.replace(lr=list(base_lrs * ratio))
                schedule = plan.lr_schedule * ratio
            elif key == "batch_size":
                batch = int(value) * plan.accumulate * plan.world_size
            else:
                variant = spec.replace(**{key: value})
            result = simulate(kernel, variant, plan.steps, batch, lr_schedule=schedule, **common)
            rows.append(
                {
                    "setting": f"{key}={value:g}",
                    "steps_to_converge": {str(e): result.training_time(e) for e in epsilons},
                    "final_loss": float(np.asarray(result.loss)[-1]),
                }
            )
    band = extended.loss_band
    return EngineResult(
        prediction=prediction,
        what_if=rows,
        extended_loss=np.asarray(extended.loss).tolist(),
        extended_band=None if band is None else [np.asarray(band[0]).tolist(), np.asarray(band[1]).tolist()],
    )
