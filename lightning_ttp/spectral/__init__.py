"""DAI compression scores over hidden-layer singular values (no Lightning).

Pure functions (torch only): normalised singular values of activation matrices
(:mod:`.spectra`), the scores of eq. (2)–(8) of the DAI paper (:mod:`.scores`) and the
give-up rule (:mod:`.decision`).
"""

from .decision import GiveUpDecision, decide
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
    layer_compression,
    layer_shift,
    shift_score,
)
from .spectra import Spectrum, effective_rank, global_avg_pool, normalized_singular_values, spectrum_of

__all__ = [
    "GiveUpDecision",
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
    "layer_compression",
    "layer_shift",
    "normalized_singular_values",
    "shift_score",
    "spectrum_of",
]
