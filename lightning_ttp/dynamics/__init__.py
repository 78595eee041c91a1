"""Function-space simulation of training on an empirical NTK (no Lightning, no models)."""

from .discrete import SimulationResult, apply_kernel, kernel_kind, simulate_discrete
from .losses import MSE, BCEWithLogits, CallableLoss, CrossEntropy, Loss, get_loss
from .montecarlo import BatchSampler, simulate_minibatch, summarize_paths
from .optim_spec import GroupSpec, OptimizerSpec

__all__ = [
    "BCEWithLogits",
    "BatchSampler",
    "CallableLoss",
    "CrossEntropy",
    "GroupSpec",
    "Loss",
    "MSE",
    "OptimizerSpec",
    "SimulationResult",
    "apply_kernel",
    "get_loss",
    "kernel_kind",
    "simulate_discrete",
    "simulate_minibatch",
    "summarize_paths",
]
