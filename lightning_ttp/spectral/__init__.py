"""DAI compression scores over hidden-layer singular values (no Lightning).

Torch only: recording hidden representations during a model's forward passes
(:mod:`.recorder`), normalised singular values of activation matrices (:mod:`.spectra`), the
scores of eq. (2)–(8) of the DAI paper (:mod:`.scores`) and the give-up rule (:mod:`.decision`).
"""

from .decision import GIVE_UP_KINDS, GiveUpDecision, decide
from .recorder import ActivationRecorder, RecordedLayer
from .scores import (
    Scores,
    SpectralConfig,
    alpha_weights,
    combined_score,
    compression_score,
    compute_scores,
    final_score,
    final_score_with_accuracy,
    is_saturated,
    is_stalled,
    layer_compression,
    layer_drift,
    layer_shift,
    shift_score,
)
from .spectra import (
    Spectrum,
    effective_rank,
    global_avg_pool,
    layer_spectra,
    normalized_singular_values,
    spectrum_of,
)

__all__ = [
    "GIVE_UP_KINDS",
    "ActivationRecorder",
    "GiveUpDecision",
    "RecordedLayer",
    "Scores",
    "SpectralConfig",
    "Spectrum",
    "alpha_weights",
    "combined_score",
    "compression_score",
    "compute_scores",
    "decide",
    "effective_rank",
    "final_score",
    "final_score_with_accuracy",
    "global_avg_pool",
    "is_saturated",
    "is_stalled",
    "layer_compression",
    "layer_drift",
    "layer_shift",
    "layer_spectra",
    "normalized_singular_values",
    "shift_score",
    "spectrum_of",
]
