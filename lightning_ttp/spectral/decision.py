"""The give-up rule (DAI paper, Sec. V–VI, with the guards described in :mod:`.scores`).

:func:`decide` is pure: the scores of one round and the :class:`~.scores.SpectralConfig` in,
``(give_up, kind, reason)`` out. Order of the checks (first match wins):

1. ``diverged``: a monitored layer has no finite activation in the latest round (NaN/inf)
   -> give up. The only kind that acts before the checkpoint (:attr:`GiveUpDecision.final`).
2. ``dead``: every monitored layer outputs only zeros -> give up.
3. ``insufficient``: fewer than two usable rounds in the window, so s_st (eq. 4) is
   undefined -> continue, and decide again at the next round (not final).
4. ``converged``: one of 5–7 would fire, but v_t >= ``keep_above`` -> continue: the run
   stopped improving at a good accuracy; stopping it is not a give-up.
5. ``saturated``: s_ot >= t2, s_st <= δ and the activation scale not drifting (eq. 7 sets
   s_F = 0) -> give up.
6. ``stalled``: |s_st| <= δ and the scale not drifting: the representation stopped moving.
7. ``fail``: s_F < t1 (paper: 0.25) -> give up.
8. ``below_target``: s_Fv (the predicted final accuracy, eq. 8) < ``target`` -> give up.
9. otherwise ``continue``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .scores import Scores, SpectralConfig

__all__ = ["GiveUpDecision", "decide", "GIVE_UP_KINDS"]

GIVE_UP_KINDS = ("diverged", "dead", "saturated", "stalled", "fail", "below_target")


@dataclass(frozen=True)
class GiveUpDecision:
    """``give_up``; ``kind`` (one of :data:`GIVE_UP_KINDS`, ``insufficient``, ``converged``,
    ``continue``, or from the callback ``error``/``other_rank``); ``reason``: a sentence."""

    give_up: bool
    kind: str
    reason: str

    @property
    def final(self) -> bool:
        """Whether this settles the run (``insufficient`` waits for the next round)."""
        return self.kind != "insufficient"


def decide(
    scores: Scores,
    config: SpectralConfig,
    target: float | None = None,
    keep_above: float | None = None,
) -> GiveUpDecision:
    """Apply the give-up rule (see the module docstring) to the scores of one round.

    Args:
        scores: :func:`~.scores.compute_scores` of the round.
        config: the thresholds t1, t2, δ, ``drift_tol`` (the same config that made the scores).
        target: optional threshold on s_Fv, a predicted accuracy in [0, 1].
        keep_above: never give up on a stuck run whose v_t is at least this.
    """
    ep = scores.epoch
    if scores.nonfinite_layers > 0 and scores.layers > 0:
        return GiveUpDecision(
            True,
            "diverged",
            f"epoch {ep}: {scores.nonfinite_layers} of {scores.layers} monitored layers have no finite "
            "activation (NaN/inf): the run diverged",
        )
    if scores.layers and scores.dead_layers == scores.layers:
        return GiveUpDecision(
            True, "dead", f"epoch {ep}: all {scores.layers} monitored layers output only zeros (dead units)"
        )
    if scores.rounds < 2 or not math.isfinite(scores.s_s) or not math.isfinite(scores.s_F):
        return GiveUpDecision(
            False,
            "insufficient",
            f"epoch {ep}: only {scores.rounds} usable validation round(s), need 2 to score the shift (eq. 4); "
            "deciding at the next round",
        )
    t1 = config.t1
    moving = "" if not math.isfinite(scores.drift) else f", scale drift {scores.drift:.3g}/round"
    keep = keep_above is not None and math.isfinite(scores.v_t) and scores.v_t >= keep_above
    stuck = scores.saturated or scores.stalled or scores.s_F < t1
    if keep and stuck:
        return GiveUpDecision(
            False,
            "converged",
            f"epoch {ep}: s_F={scores.s_F:.4g} (saturated={scores.saturated}, stalled={scores.stalled}) but "
            f"v_t={scores.v_t:.4g} >= keep_above={keep_above:g}; kept (converged at a good accuracy)",
        )
    if scores.saturated:
        return GiveUpDecision(
            True,
            "saturated",
            f"epoch {ep}: saturated, s_o={scores.s_o:.4g} >= t2={config.t2:g} and s_s={scores.s_s:.3g} <= "
            f"delta={config.delta:g}{moving} (spectrum compressed and no longer changing)",
        )
    if scores.stalled:
        return GiveUpDecision(
            True,
            "stalled",
            f"epoch {ep}: stalled, |s_s|={abs(scores.s_s):.3g} <= delta={config.delta:g}{moving} <= "
            f"{config.drift_tol:g} (the representation no longer changes)",
        )
    if scores.s_F < t1:
        return GiveUpDecision(
            True,
            "fail",
            f"epoch {ep}: s_F={scores.s_F:.4g} < t1={t1:g} (s_o={scores.s_o:.4g}, s_s={scores.s_s:.3g}{moving}): "
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
