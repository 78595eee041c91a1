"""Function-space simulation of training on an empirical NTK (no Lightning, no models).

Modules: ``losses`` (∇_f L, curvature, error), ``optim_spec`` (the optimiser as data),
``discrete`` (exact linearised SGD/momentum/Nesterov/weight decay), ``montecarlo``
(mini-batch SGD), ``adam`` (Adam/AdamW approximation), ``ode`` / ``sde`` (the paper's eq. 1), ``closed_form`` (eq. 4–5),
``extrapolate`` (Appendix D), ``training_time`` (ε-training-time), ``stability``.
"""

from .adam import simulate_adam
from .closed_form import MSESpectrum, mse_curve_from_spectrum, mse_spectrum, simulate_mse_closed_form
from .discrete import SimulationResult, apply_kernel, kernel_kind, kronecker_factor, simulate_discrete
from .extrapolate import PowerLaw, extrapolate_spectrum, extrapolated_mse_curve, fit_power_law
from .losses import MSE, BCEWithLogits, CallableLoss, CrossEntropy, Loss, get_loss
from .montecarlo import BatchSampler, simulate_minibatch, summarize_paths
from .ode import simulate_ode
from .optim_spec import GroupSpec, OptimizerSpec
from .sde import simulate_sde
from .stability import lambda_max, stability_bound, stability_report
from .training_time import (
    epsilon_training_time,
    first_step_at_or_above,
    first_step_at_or_below,
    smooth_curve,
    still_falling,
)

__all__ = [
    "BCEWithLogits",
    "BatchSampler",
    "CallableLoss",
    "CrossEntropy",
    "GroupSpec",
    "Loss",
    "MSE",
    "MSESpectrum",
    "OptimizerSpec",
    "PowerLaw",
    "SimulationResult",
    "apply_kernel",
    "epsilon_training_time",
    "extrapolate_spectrum",
    "extrapolated_mse_curve",
    "first_step_at_or_above",
    "first_step_at_or_below",
    "fit_power_law",
    "get_loss",
    "kernel_kind",
    "kronecker_factor",
    "lambda_max",
    "mse_curve_from_spectrum",
    "mse_spectrum",
    "simulate_adam",
    "simulate_discrete",
    "simulate_minibatch",
    "simulate_mse_closed_form",
    "simulate_ode",
    "simulate_sde",
    "smooth_curve",
    "still_falling",
    "stability_bound",
    "stability_report",
    "summarize_paths",
]
