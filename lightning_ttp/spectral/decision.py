"""The give-up rule at the checkpoint round (DAI paper, Sec. V–VI).

Order of the checks (first match wins):

1. ``dead``: every monitored layer has all-zero activations -> give up.
2. ``nonfinite``: no layer has a finite spectrum (NaN/inf activations: the run diverged)
   -> give up.
3. ``insufficient``: fewer than two usable rounds in the window, so s_st (eq. 4) is
   undefined -> continue (never kill on missing evidence).
4. ``saturated``: s_ot >= t2 and s_st <= δ (eq. 7 sets s_F = 0): the spectrum is
   compressed and no longer moving, further training will not change it -> stop.
   With v_t known and ``keep_above`` set, a run whose accuracy is already at least
   that value is kept here and in 5. (kind ``converged``: it stopped improving at a good
   solution; stopping it loses nothing, but it is the user's call, not a give-up).
5. ``fail``: s_F < t1 (paper: t1 = 0.25) -> give up.
6. ``below_target``: a target on s_Fv (the predicted final accuracy, eq. 8) is set and
   s_Fv < target -> give up.
7. otherwise ``continue``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .scores import Scores

__all__ = ["GiveUpDecision", "decide"]


@dataclass(frozen=True)
class GiveUpDecision:
    give_up: bool
    kind: str  # dead|nonfinite|insufficient|saturated|converged|fail|below_target|continue
    reason: str


def decide(
    scores: Scores,
    t1: float = 0.25,
    target: float | None = None,
    keep_above: float | None = None,
) -> GiveUpDecision:
    """Apply the give-up rule (see the module docstring) to the scores of the checkpoint round."""
    ep = scores.epoch
    if scores.layers and scores.dead_layers == scores.layers:
        return GiveUpDecision(
            True, "dead", f"epoch {ep}: all {scores.layers} monitored layers output only zeros (dead units)"
        )
    if not math.isfinite(scores.s_o):
        return GiveUpDecision(
            True,
            "nonfinite",
            f"epoch {ep}: no monitored layer has a finite spectrum (NaN/inf activations: the run diverged)",
        )
    if scores.rounds < 2 or not math.isfinite(scores.s_s):
        return GiveUpDecision(
            False,
            "insufficient",
            f"epoch {ep}: only {scores.rounds} usable validation round(s), need 2 to score the shift (eq. 4)",
        )
    keep = keep_above is not None and math.isfinite(scores.v_t) and scores.v_t >= keep_above
    stuck = scores.saturated or (math.isfinite(scores.s_F) and scores.s_F < t1)
    if keep and stuck:
        return GiveUpDecision(
            False,
            "converged",
            f"epoch {ep}: s_F={scores.s_F:.4g} (saturated={scores.saturated}) but v_t={scores.v_t:.4g} >= "
            f"keep_above={keep_above:g}; kept (converged at a good accuracy)",
        )
    if scores.saturated:
        return GiveUpDecision(
            True,
            "saturated",
            f"epoch {ep}: saturated, s_o={scores.s_o:.4g} >= t2 and s_s={scores.s_s:.3g} <= delta "
            "(spectrum compressed and no longer changing; more training will not help)",
        )
    if not math.isfinite(scores.s_F):
        return GiveUpDecision(False, "insufficient", f"epoch {ep}: s_F is undefined")
    if scores.s_F < t1:
        return GiveUpDecision(
            True,
            "fail",
            f"epoch {ep}: s_F={scores.s_F:.4g} < t1={t1:g} (s_o={scores.s_o:.4g}, s_s={scores.s_s:.3g}): "
            "predicted not to train successfully",
        )
    if target is not None and math.isfinite(scores.s_Fv) and scores.s_Fv < target:
        return GiveUpDecision(
            True,
            "below_target",
            f"epoch {ep}: predicted final accuracy s_Fv={scores.s_Fv:.4g} < target {target:g} "
            f"(v_t={scores.v_t:.4g})",
        )
    return GiveUpDecision(
        False, "continue", f"epoch {ep}: s_F={scores.s_F:.4g} >= t1={t1:g}; predicted to keep training"
    )
