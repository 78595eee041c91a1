"""Per-step hyper-parameters of a run, as Lightning steps the user's schedulers.

One implementation serves :func:`lightning_ttp.predict_training_time` and the Lightning
callback. The schedulers are deep-copied onto a throw-away optimiser (one dummy parameter per
param group, the groups' hyper-parameters copied verbatim) and stepped there: the user's
optimiser and schedulers are never touched.

Lightning's semantics (``training_epoch_loop.py``), reproduced micro-batch by micro-batch:

- an optimiser step is taken after micro-batch ``b`` (0-based within the epoch) when
  ``(b + 1) % accumulate == 0`` or ``b`` is the epoch's last batch;
- right after it, every ``interval="step"`` scheduler with ``(b + 1) % frequency == 0`` steps
  (``b`` is the *batch index within the epoch*, not the global step);
- after the epoch's last batch, every ``interval="epoch"`` scheduler with
  ``(epoch + 1) % frequency == 0`` steps.

``ReduceLROnPlateau`` depends on metrics not known in advance: its lr is held (and noted).
Pure torch/numpy: no Lightning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["HyperSchedule", "SchedulerSpec", "hyper_schedule", "lr_schedule_from_scheduler"]


@dataclass(frozen=True)
class SchedulerSpec:
    """A scheduler and when Lightning steps it (the fields of Lightning's ``LRSchedulerConfig``)."""

    scheduler: Any
    interval: Literal["step", "epoch"] = "epoch"
    frequency: int = 1

    def __post_init__(self) -> None:
        if self.interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {self.interval!r}")
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"frequency must be an int >= 1, got {self.frequency!r}")


@dataclass
class HyperSchedule:
    """Per optimiser step and param group: learning rate and momentum (β₁ for Adam).

    Attributes:
        lr: ``(steps, num_groups)`` learning rates.
        momentum: ``(steps, num_groups)`` momentum coefficients (``momentum`` of SGD, ``betas[0]``
            of Adam-type optimisers; zeros when the optimiser has neither).
        notes: what had to be assumed.
    """

    lr: np.ndarray
    momentum: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def momentum_varies(self) -> bool:
        return bool(np.ptp(self.momentum, axis=0).max(initial=0.0) > 0.0)


def _momentum(group: dict[str, Any]) -> float:
    if "betas" in group:
        return float(group["betas"][0])
    return float(group.get("momentum", 0.0))


def _row(optimizer: torch.optim.Optimizer) -> tuple[list[float], list[float]]:
    return [float(g["lr"]) for g in optimizer.param_groups], [_momentum(g) for g in optimizer.param_groups]


def _dummy_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An SGD optimiser over one scalar per param group carrying verbatim copies of the
    groups' hyper-parameters, so that a scheduler deep-copied onto it can be stepped freely."""
    groups = [{**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"},
               "params": [torch.nn.Parameter(torch.zeros(1))]} for g in optimizer.param_groups]
    dummy = torch.optim.SGD(groups, lr=float(optimizer.param_groups[0]["lr"]))
    for g, original in zip(dummy.param_groups, optimizer.param_groups, strict=True):
        g.update({k: copy.deepcopy(v) for k, v in original.items() if k != "params"})
    return dummy


def hyper_schedule(
    optimizer: torch.optim.Optimizer,
    schedulers: Sequence[SchedulerSpec],
    steps: int,
    *,
    batches_per_epoch: int | None,
    accumulate: int = 1,
) -> HyperSchedule:
    """The lr and momentum of every param group at optimiser steps ``0..steps-1``.

    Args:
        optimizer: the optimiser the schedulers are bound to (read, never stepped).
        schedulers: the schedulers with Lightning's ``interval`` and ``frequency``.
        steps: optimiser steps to cover.
        batches_per_epoch: micro-batches per epoch (``None``: unknown, e.g. an
            ``IterableDataset``; epoch-interval schedulers are then held, with a note).
        accumulate: ``accumulate_grad_batches``.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    lrs0, mom0 = _row(optimizer)
    lr = np.tile(np.asarray(lrs0, dtype=np.float64), (steps, 1))
    momentum = np.tile(np.asarray(mom0, dtype=np.float64), (steps, 1))
    notes: list[str] = []
    dummy = _dummy_optimizer(optimizer)
    memo = {id(optimizer): dummy}
    live: list[SchedulerSpec] = []
    for spec in schedulers:
        name = type(spec.scheduler).__name__
        if isinstance(spec.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            notes.append("ReduceLROnPlateau depends on future metrics; the learning rate is held constant.")
        elif getattr(spec.scheduler, "optimizer", None) is not optimizer:
            notes.append(f"{name} is not bound to the predicted optimiser; ignored.")
        elif spec.interval == "epoch" and not batches_per_epoch:
            notes.append(f"{name} steps per epoch but the epoch length is unknown (iterable data); "
                         "the learning rate is held constant.")
        else:
            live.append(SchedulerSpec(copy.deepcopy(spec.scheduler, memo), spec.interval, spec.frequency))
    if not live:
        return HyperSchedule(lr, momentum, notes)
    per_epoch = batches_per_epoch or 0
    t, batch, epoch = 0, 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedulers warn about stepping order on a fresh optimiser
        while t < steps:
            last_of_epoch = per_epoch > 0 and batch + 1 == per_epoch
            if (batch + 1) % accumulate == 0 or last_of_epoch:
                lr[t], momentum[t] = _row(dummy)
                dummy.step()
                t += 1
                for spec in live:
                    if spec.interval == "step" and (batch + 1) % spec.frequency == 0:
                        spec.scheduler.step()
            if last_of_epoch:
                for spec in live:
                    if spec.interval == "epoch" and (epoch + 1) % spec.frequency == 0:
                        spec.scheduler.step()
                batch, epoch = 0, epoch + 1
            else:
                batch += 1
    return HyperSchedule(lr, momentum, notes)


def lr_schedule_from_scheduler(scheduler: Any, steps: int, *, interval: str = "step",
                               steps_per_epoch: int | None = None, frequency: int = 1) -> np.ndarray:
    """Per-step learning rates ``(steps, num_groups)`` of one scheduler without accumulation.

    A shorthand for :func:`hyper_schedule` with ``batches_per_epoch=steps_per_epoch``.
    """
    optimizer = getattr(scheduler, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("lr_scheduler must be a torch.optim.lr_scheduler object bound to an optimizer")
    if interval == "epoch" and not steps_per_epoch:
        raise ValueError("interval='epoch' needs steps_per_epoch")
    spec = SchedulerSpec(scheduler, interval, frequency)  # type: ignore[arg-type]
    result = hyper_schedule(optimizer, [spec], steps, batches_per_epoch=steps_per_epoch)
    for note in result.notes:
        warnings.warn(note, stacklevel=2)
    return result.lr
