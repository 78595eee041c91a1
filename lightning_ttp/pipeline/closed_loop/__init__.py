"""The closed loop: re-predict the rest of a run from its current state, during training.

See :mod:`lightning_ttp.pipeline.closed_loop.loop` for the steps; the public names are here.
"""

from __future__ import annotations

from .loop import (
    DEFAULT_FRACTIONS,
    ClosedLoop,
    KernelDrift,
    LivePrediction,
    centred_alignment,
    checkpoint_steps,
    continuation_batches,
    kernel_drift,
    relinearised_prediction,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "ClosedLoop",
    "KernelDrift",
    "LivePrediction",
    "centred_alignment",
    "checkpoint_steps",
    "continuation_batches",
    "kernel_drift",
    "relinearised_prediction",
]
