"""The give-up's state across one fit, and what is read off it between validation rounds.

:class:`GiveUpState` is everything :class:`lightning_ttp.callbacks.EarlyGiveUp` keeps across a
checkpoint (as plain Python, :meth:`GiveUpState.to_dict`); the functions here are the computations
the callback makes on it between its hooks: the window of the last t0 + 1 rounds of spectra
(:meth:`GiveUpState.add_round`), a round's scores as a history entry and as metrics, the value an
Optuna trial is told, the ``keep_above`` threshold, the validation accuracy's predictions from the
logits, and the decision of a round (:func:`round_decision`, which only the checkpoint round or a
divergence gets). A plain-PyTorch training loop can keep the same state and call the same functions.

This module is pure torch: no Lightning, no models, no clocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..spectral import GiveUpDecision, Scores, SpectralConfig, decide

__all__ = [
    "GiveUpState",
    "accuracy_predictions",
    "keep_above_threshold",
    "round_decision",
    "score_entry",
    "score_metrics",
    "trial_value",
]

#: the scores a round logs (``give_up/<key>``)
METRIC_KEYS = ("s_o", "s_s", "s_t", "s_F", "s_Fv", "v_t", "drift")


@dataclass
class GiveUpState:
    """Everything ``EarlyGiveUp`` learns during one fit (saved in checkpoints, reset by each fit)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    spectra: list[list[torch.Tensor]] = field(default_factory=list)  # last t0 + 1 rounds x layers
    scales: list[list[float]] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    decision: GiveUpDecision | None = None
    decision_epoch: int | None = None
    gave_up: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain Python containers only, so a checkpoint loads with ``weights_only=True``."""
        d = self.decision
        return {
            "history": [dict(h) for h in self.history],
            "spectra": [[s.tolist() for s in rnd] for rnd in self.spectra],
            "scales": [list(r) for r in self.scales],
            "units": list(self.units),
            "layers": list(self.layers),
            "decision": None if d is None else {"give_up": d.give_up, "kind": d.kind, "reason": d.reason},
            "decision_epoch": self.decision_epoch,
            "gave_up": self.gave_up,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GiveUpState:
        """Inverse of :meth:`to_dict` (the spectra come back as float64 tensors)."""
        d = data["decision"]
        return cls(
            history=[dict(h) for h in data["history"]],
            spectra=[[torch.tensor(s, dtype=torch.float64) for s in rnd] for rnd in data["spectra"]],
            scales=[list(r) for r in data["scales"]],
            units=list(data["units"]),
            layers=list(data["layers"]),
            decision=None if d is None else GiveUpDecision(bool(d["give_up"]), d["kind"], d["reason"]),
            decision_epoch=data["decision_epoch"],
            gave_up=bool(data["gave_up"]),
        )

    def add_round(self, values: list[torch.Tensor], scales: list[float], units: list[int], t0: int) -> None:
        """Append one round's spectra and scales (:func:`lightning_ttp.spectral.layer_spectra`),
        keeping the last t0 + 1 rounds: what eq. (2)–(5) look back over."""
        self.spectra = (self.spectra + [values])[-(t0 + 1) :]
        self.scales = (self.scales + [scales])[-(t0 + 1) :]
        self.units = units


def score_entry(scores: Scores) -> dict[str, Any]:
    """A round's scores as one history entry (plain values, lists copied)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in scores.as_dict().items()}


def score_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The round's scores as metrics; none for a round with non-finite activations (its scores
    are undefined: that round logs its decision, ``give_up/gave_up``, instead)."""
    if entry.get("nonfinite_layers"):
        return {}
    return {f"give_up/{k}": float(entry[k]) for k in METRIC_KEYS if math.isfinite(entry[k])}


def trial_value(entry: dict[str, Any]) -> float | None:
    """What an Optuna trial is told of a round: s_Fv (a predicted accuracy); s_F without v_t;
    None where both are undefined or the activations were non-finite."""
    value = entry["s_Fv"] if math.isfinite(entry["s_Fv"]) else entry["s_F"]
    if math.isfinite(value) and not entry.get("nonfinite_layers"):
        return float(value)
    return None


def keep_above_threshold(keep_above: float | Literal["auto"] | None, classes: int | None) -> float | None:
    """The v_t above which a stuck run is kept: ``"auto"`` is halfway between chance (1 / classes)
    and 1, None while the number of classes is unknown; a number is itself; None is off."""
    if keep_above == "auto":
        if classes is None:
            return None
        chance = 1.0 / classes
        return chance + 0.5 * (1.0 - chance)
    return None if keep_above is None else float(keep_above)


def accuracy_predictions(logits: torch.Tensor, targets: Any) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(classes, predictions, targets) for a torchmetrics accuracy of one validation batch, or None
    when the batch is not a classification (integer 1-D targets, 1-D or 2-D logits, as many rows).

    The classes are the logits' columns (2 for a single logit); the predictions are the argmax (or
    ``logit > 0``), and a row whose logits are non-finite counts as wrong: a diverged output is no
    prediction. The targets are moved to the logits' device.
    """
    if (
        not isinstance(targets, torch.Tensor)
        or targets.dtype.is_floating_point
        or targets.dim() != 1
        or logits.dim() not in (1, 2)
        or logits.shape[0] != targets.shape[0]
    ):
        return None
    classes = int(logits.shape[1]) if logits.dim() == 2 and logits.shape[1] >= 2 else 2
    targets = targets.to(logits.device)
    finite = torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)
    if classes > 2 or logits.dim() == 2:
        preds = logits.float().argmax(dim=1) if logits.dim() == 2 else (logits > 0).long()
        preds = torch.where(finite, preds, (targets + 1) % classes)
        if classes == 2:
            preds = preds.float()
    else:
        preds = torch.where(finite, (logits.float() > 0).float(), 1.0 - targets.float())
    return classes, preds, targets


def round_decision(
    state: GiveUpState,
    config: SpectralConfig,
    checkpoint_epoch: int,
    target_accuracy: float | None = None,
    keep_above: float | None = None,
) -> tuple[int, GiveUpDecision] | None:
    """(epoch, decision) of the latest round by :func:`lightning_ttp.spectral.decide`, or None when
    the round takes none: the run was given up on already or has no round yet, or the round falls
    before ``checkpoint_epoch`` or after the final decision (only a divergence acts there)."""
    if state.gave_up or not state.history:
        return None
    entry = state.history[-1]
    epoch = int(entry["epoch"])
    decided = state.decision is not None and state.decision.final
    decision = decide(Scores(**entry), config, target_accuracy, keep_above)
    if decision.kind != "diverged" and (decided or epoch < checkpoint_epoch):
        return None
    return epoch, decision
