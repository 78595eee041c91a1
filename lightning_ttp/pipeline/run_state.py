"""The prediction's state across one training run, and what is read off it while the run goes on.

:class:`PredictorState` is everything :class:`lightning_ttp.callbacks.TrainingTimePredictor` keeps
across a checkpoint (as plain Python, :meth:`PredictorState.to_dict`); the functions here are the
computations the callback makes on it between its hooks: the current curve and its refit to the
observed losses, the ε-training-time read off it, the ETA, when the fixed early refits fall, and
whether the real run diverged. A plain-PyTorch training loop can keep the same state and call the
same functions.

This module is pure numpy: no Lightning, no models, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..dynamics.training_time import epsilon_training_time
from .prediction import Prediction, plain_python
from .refine import Refinement, refine_curve

__all__ = ["LIVE_FRACTIONS", "PredictorState", "converge_step", "eta", "real_run_diverged", "refit_steps",
           "relinearisation_steps"]

#: fractions of the planned run at which the closed loop refits, whatever the time budget
LIVE_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5)


@dataclass
class PredictorState:
    """Everything the predictor keeps across a checkpoint, in one place.

    Attributes:
        prediction: the open-loop prediction made at fit start.
        refinement: the latest closed-loop refinement from the observed losses.
        plan: the run's plan as plain values (:meth:`lightning_ttp.pipeline.plan.RunPlan.describe`).
        what_if: rows of the what-if study.
        cost_seconds: wall-clock of the fit-start prediction (the what-if table not included).
        what_if_seconds: wall-clock of the what-if table's simulations.
        observed_losses: the real training loss of every optimiser step so far.
        live_loss: the latest re-linearised prediction of the whole curve (steps 0..T), made at
            optimiser step ``live_step`` (:mod:`lightning_ttp.pipeline.closed_loop`).
        live_seconds: wall-clock spent re-linearising so far.
    """

    prediction: Prediction | None = None
    refinement: Refinement | None = None
    plan: dict[str, Any] | None = None
    what_if: list[dict[str, Any]] = field(default_factory=list)
    cost_seconds: float | None = None
    what_if_seconds: float = 0.0
    observed_losses: list[float] = field(default_factory=list)
    live_loss: list[float] | None = None
    live_step: int | None = None
    live_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python containers only, so a checkpoint loads with ``weights_only=True``."""
        return plain_python({
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "refinement": None if self.refinement is None else self.refinement.to_dict(),
            "plan": self.plan,
            "what_if": self.what_if,
            "cost_seconds": self.cost_seconds,
            "what_if_seconds": self.what_if_seconds,
            "observed_losses": [float(x) for x in self.observed_losses],
            "live_loss": self.live_loss,
            "live_step": self.live_step,
            "live_seconds": self.live_seconds,
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PredictorState:
        """Inverse of :meth:`to_dict`; every key must be present (``what_if_seconds`` may be
        missing: states saved before it existed)."""
        missing = {f.name for f in fields(cls)} - set(data) - {"what_if_seconds"}
        if missing:
            raise KeyError(f"the TrainingTimePredictor state is missing {sorted(missing)}; was it saved by this "
                           "version of lightning_ttp?")
        return cls(
            prediction=None if data["prediction"] is None else Prediction.from_dict(data["prediction"]),
            refinement=None if data["refinement"] is None else Refinement.from_dict(data["refinement"]),
            plan=data["plan"],
            what_if=list(data["what_if"]),
            cost_seconds=data["cost_seconds"],
            what_if_seconds=float(data.get("what_if_seconds", 0.0)),
            observed_losses=[float(x) for x in data["observed_losses"]],
            live_loss=data["live_loss"],
            live_step=data["live_step"],
            live_seconds=float(data["live_seconds"]),
        )

    def current_curve(self) -> np.ndarray:
        """The best current estimate of the run's loss curve (steps 0..T): the refit of the
        latest re-linearised curve (or of the open-loop prediction) to the observed losses."""
        if self.refinement is not None:
            return self.refinement.loss
        if self.live_loss is not None:
            return np.asarray(self.live_loss)
        if self.prediction is None:
            raise RuntimeError("no prediction yet")
        return self.prediction.loss

    def refit(self, observed: Sequence[float], *, fresh: bool = False) -> Refinement:
        """The latest curve refitted to the observed losses
        (:func:`lightning_ttp.pipeline.refine.refine_curve`, started from the last refit, or afresh
        with ``fresh``: then the result does not depend on which refits came before).

        The curve is the re-linearised one when there is one, continued past T by the open
        loop's continuation scaled to join it at T (:math:`c_t \\, L^{\\text{live}}_T / L_T`), else
        the open-loop prediction with its continuation and band: either way a run faster than
        predicted is followed beyond T instead of meeting a flat tail (which converges too early).
        """
        pred = self.prediction
        if pred is None:
            raise RuntimeError("no prediction yet")
        if self.live_loss is not None:
            live = np.asarray(self.live_loss)
            finite = pred.continuation is not None and not pred.diverged and np.isfinite(pred.continuation).all()
            tail = pred.continuation if finite else np.empty(0)
            join = live[-1] / pred.loss[-1] if pred.loss[-1] > 0 else 1.0
            return refine_curve(np.concatenate([live, tail * join]), observed,
                                horizon=pred.num_steps, start=None if fresh else self.refinement)
        return refine_curve(pred.extended_loss(), observed, band=pred.extended_band(),
                            horizon=pred.num_steps, start=None if fresh else self.refinement)


def converge_step(curve: np.ndarray, eps: float, step_unit: int = 1) -> int | None:
    """ε-training-time of ``curve`` (:func:`lightning_ttp.dynamics.epsilon_training_time`) in
    units of ``step_unit`` (``global_step`` per optimiser step); None when it never converges."""
    value = epsilon_training_time(curve, eps)
    return None if value is None else int(value) * step_unit


def eta(
    converge: int | None, global_step: int, planned_steps: int | None, seconds_per_step: float | None,
) -> dict[str, float | int | None]:
    """Steps and seconds remaining from ``global_step`` to ``converge`` and to ``planned_steps``
    (each None when its input is unknown; the steps never below 0)."""
    to_converge = None if converge is None else max(0, converge - global_step)
    to_end = None if planned_steps is None else max(0, planned_steps - global_step)
    sps = seconds_per_step
    return {
        "converge_step": converge,
        "steps_to_converge": to_converge,
        "steps_to_end": to_end,
        "seconds_per_step": sps,
        "eta_converge_seconds": None if sps is None or to_converge is None else to_converge * sps,
        "eta_end_seconds": None if sps is None or to_end is None else to_end * sps,
    }


def refit_steps(planned_steps: int) -> list[int]:
    """The steps of the fixed early refits: :data:`LIVE_FRACTIONS` of ``planned_steps``, rounded,
    at least step 2, each once (a fraction that falls before step 2 is dropped)."""
    return sorted({max(2, int(round(f * planned_steps))) for f in LIVE_FRACTIONS if f * planned_steps >= 2})


def relinearisation_steps(loop_steps: Sequence[int], counts: dict[str, Any] | None, total_steps: int,
                          share: float) -> list[int]:
    """The closed loop's steps whose re-linearisations fit its budget, decided at fit start from
    counts (never timed: the same steps on any machine, at any load).

    A call at step k counts the kernel at w_k (``relinearisation_macs``: same subset, same kind, on
    the subset's batch statistics where the model trains on them, whatever the optimiser; counts
    saved without it: the fit-start kernel's passes, contraction and extras) and the simulation of
    the T − k remaining steps (the fit-start simulation's count per simulated step). The first
    call is always made (runs of any length get one); each later one while the loop's total stays
    within ``share`` × one process's share of the run's count plus the fit-start prediction's
    count (both one process's when the kernel is split across processes). ``counts`` is
    the prediction's ``diagnostics["budget"]`` (:class:`lightning_ttp.pipeline.budget.KernelChoice`);
    without it (a projected kernel is not counted) only the first call is made.
    """
    steps = sorted(int(k) for k in loop_steps)
    if not steps or counts is None:
        return steps[:1]
    parts = counts["components"]
    kernel = counts.get("relinearisation_macs") or (
        parts.get("passes", 0.0) + parts.get("contraction", 0.0) + parts.get("extras", 0.0))
    per_step = parts.get("simulation", 0.0) / max(int(counts.get("simulated_steps") or total_steps), 1)
    # the counts are one process's (the kernel split across processes): so is the run's share
    allowed = share * counts["run_macs"] / max(1, int(counts.get("processes") or 1)) + counts["predicted_macs"]
    chosen, spent = [], 0.0
    for k in steps:
        cost = kernel + per_step * (total_steps - k)
        if not chosen or spent + cost <= allowed:
            chosen.append(k)
            spent += cost
    return chosen


def real_run_diverged(observed: Sequence[float]) -> bool:
    """Whether the latest observed loss is non-finite (the real run diverged: nothing of it can
    be refined or re-linearised)."""
    return bool(observed) and not math.isfinite(observed[-1])
