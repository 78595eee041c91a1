"""The public entry point: predict the loss curve and training time of a fine-tuning run.

``predict_training_time`` runs the whole pipeline in one call (plan → subset → kernel at w0 →
simulation → look-ahead; the steps are listed in :mod:`lightning_ttp.pipeline.predict`), and the
Lightning callback runs the same steps from a ``Trainer``. The pieces are public so that a caller
estimates the kernel once and simulates many "what-if" settings on it
(:func:`~lightning_ttp.pipeline.simulate.what_if`).

This module is the facade of :mod:`lightning_ttp.pipeline` (where each name is defined, in the
order the pipeline runs; ``docs/architecture.md``): it re-exports the public names and defines none.
"""

from __future__ import annotations

from .pipeline.estimate import KernelEstimate, estimate_kernel
from .pipeline.plan import RunPlan, plan_run
from .pipeline.predict import DEFAULT_BUDGET as DEFAULT_BUDGET  # the defaults of predict_training_time
from .pipeline.predict import DEFAULT_NUM_SAMPLES as DEFAULT_NUM_SAMPLES
from .pipeline.predict import RunPrediction, predict_run, predict_training_time
from .pipeline.schedules import lr_schedule_from_scheduler
from .pipeline.simulate import Method, simulate, simulate_plan, what_if

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
