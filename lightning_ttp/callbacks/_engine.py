"""The callback's one door to the prediction engine (:mod:`lightning_ttp.api`).

One kernel estimate per fit; the Trainer's run and every what-if variant are simulations
on that same kernel. Kept apart from the callback so that the Lightning glue does not
depend on the engine's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._trainer_state import TrainingPlan

__all__ = ["EngineResult", "predict", "prediction_from_dict"]


@dataclass
class EngineResult:
    prediction: Any
    what_if: list[dict[str, Any]] = field(default_factory=list)


def prediction_from_dict(data: dict[str, Any]) -> Any:
    """``Prediction.from_dict`` of the engine."""
    from ..prediction import Prediction

    return Prediction.from_dict(data)


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
    prediction = simulate(kernel, spec, plan.steps, plan.effective_batch_size, lr_schedule=plan.lr_schedule,
                          **common)
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
                    "steps_to_converge": {str(e): int(result.training_time(e)) for e in epsilons},
                    "final_loss": float(np.asarray(result.loss)[-1]),
                }
            )
    return EngineResult(prediction=prediction, what_if=rows)
