"""The plan of a run: what the optimiser is about to do, in optimiser steps.

A :class:`RunPlan` is the one description of a training run that the prediction pipeline
reads, whoever builds it: :func:`plan_run` from (data, optimiser, scheduler) for
:func:`lightning_ttp.predict_training_time`, or the Lightning callback from a ``Trainer``
(``lightning_ttp.callbacks._trainer_state.plan_from_trainer``). Both use the same schedule
semantics (:mod:`lightning_ttp.pipeline.schedules`). Pure torch/numpy: no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from .data import dataset_samples, loader_batch_size, num_samples_in, split_batch
from .schedules import HyperSchedule, SchedulerSpec, hyper_schedule

__all__ = ["RunPlan", "check_steps", "loader_shuffles", "plan_run"]


def check_steps(steps: Any) -> int:
    """``steps`` as a positive int, or a ``ValueError`` that says what is expected."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive int (number of optimiser steps), got {steps!r}")
    return int(steps)


@dataclass
class RunPlan:
    """What the optimiser is about to do, in optimiser steps (after gradient accumulation).

    Attributes:
        steps: planned optimiser steps T.
        batch_size: samples per micro-batch on one process.
        schedule: per-step lr and momentum of every param group.
        accumulate: ``accumulate_grad_batches``.
        world_size: number of data-parallel processes.
        dataset_size: training samples per epoch over all processes (``None``: unknown).
        batches_per_epoch: micro-batches per epoch on one process (``None``: unknown).
        drop_last: whether the loader drops the last incomplete batch.
        shuffle: whether the data is reshuffled every epoch.
        iterable: the data is an ``IterableDataset``.
        global_steps_per_step: the run's step counter advances this much per predicted optimiser
            step (Lightning's ``global_step`` counts every optimiser's steps under manual
            optimisation with several optimisers); curves and ETAs are reported in its units.
        notes: what the plan had to assume, as sentences.
    """

    steps: int
    batch_size: int
    schedule: HyperSchedule
    accumulate: int = 1
    world_size: int = 1
    dataset_size: int | None = None
    batches_per_epoch: int | None = None
    drop_last: bool = False
    shuffle: bool = True
    iterable: bool = False
    global_steps_per_step: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimiser step: ``batch_size × accumulate × world_size``."""
        return self.batch_size * self.accumulate * self.world_size

    @property
    def full_batch(self) -> bool:
        """Every optimiser step sees the whole (known-size) data set: gradient descent."""
        return self.dataset_size is not None and self.effective_batch_size >= self.dataset_size

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimiser steps per epoch (``None``: unknown)."""
        if not self.batches_per_epoch:
            return None
        return max(1, math.ceil(self.batches_per_epoch / self.accumulate))

    @property
    def lr_schedule(self) -> np.ndarray:
        """``(steps, num_groups)`` learning rates."""
        return self.schedule.lr

    def describe(self) -> dict[str, Any]:
        """Plain-python summary (logged, kept in checkpoints)."""
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "accumulate_grad_batches": self.accumulate,
            "world_size": self.world_size,
            "effective_batch_size": self.effective_batch_size,
            "dataset_size": self.dataset_size,
            "steps_per_epoch": self.steps_per_epoch,
            "drop_last": self.drop_last,
            "iterable": self.iterable,
            "shuffle": self.shuffle,
            "full_batch": self.full_batch,
            "global_steps_per_step": self.global_steps_per_step,
            "notes": list(self.notes) + list(self.schedule.notes),
        }


def loader_shuffles(loader: DataLoader) -> bool:
    """Whether ``loader`` draws a new order every epoch (a random or distributed-shuffled sampler)."""
    if isinstance(loader.dataset, IterableDataset):
        return False
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, SequentialSampler):
        return False
    return bool(getattr(sampler, "shuffle", True))


def plan_run(
    data: DataLoader | tuple[Any, Any],
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    lr_scheduler: Any = None,
    scheduler_interval: str = "step",
    scheduler_frequency: int = 1,
    batch_size: int | None = None,
    accumulate: int = 1,
) -> RunPlan:
    """The plan of a plain PyTorch run: ``steps`` optimiser steps over ``data``.

    Args:
        data: the training ``DataLoader`` (batch size, ``drop_last``, shuffling and the epoch
            length are read from it) or an ``(inputs, targets)`` pair (full-batch gradient
            descent unless ``batch_size`` is given; shuffled mini-batches otherwise).
        optimizer: the ``torch.optim`` optimiser (read, never stepped).
        steps: optimiser steps T.
        lr_scheduler: a scheduler bound to ``optimizer``, stepped every ``scheduler_frequency``
            batches (``scheduler_interval="step"``) or epochs (``"epoch"``), as Lightning does.
        batch_size: overrides the loader's batch size (per micro-batch).
        accumulate: micro-batches per optimiser step.
    """
    steps = check_steps(steps)
    schedulers: Sequence[SchedulerSpec] = ()
    if lr_scheduler is not None:
        if not isinstance(getattr(lr_scheduler, "optimizer", None), torch.optim.Optimizer):
            raise TypeError("lr_scheduler must be a torch.optim.lr_scheduler object bound to the optimizer")
        schedulers = (SchedulerSpec(lr_scheduler, scheduler_interval, scheduler_frequency),)  # type: ignore[arg-type]
    notes: list[str] = []
    if isinstance(data, DataLoader):
        iterable = isinstance(data.dataset, IterableDataset)
        size, counted = dataset_samples(data)  # samples, not items, for pre-batched data
        if counted:
            notes.append(counted)
        bs = batch_size or loader_batch_size(data)
        if bs is None:  # pre-batched items: read the size of one
            bs = num_samples_in(split_batch(data.dataset[0] if size else next(iter(data)))[0])
            notes.append(f"batch size read from the first batch: {bs}.")
        try:
            batches = len(data)
        except TypeError:
            batches = None
        if size is None:
            notes.append("the dataset has no len(): its size is taken as the samples read for the kernel.")
        drop_last, shuffle = bool(data.drop_last), loader_shuffles(data)
    elif isinstance(data, (list, tuple)) and len(data) == 2:
        size = num_samples_in(data[0])
        if size == 0:
            raise ValueError("the data is empty (0 samples)")
        bs, iterable, drop_last, shuffle = batch_size or size, False, False, True
        batches = math.ceil(size / bs)
    else:
        raise TypeError("data must be a torch DataLoader or an (inputs, targets) pair")
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    schedule = hyper_schedule(optimizer, schedulers, steps, batches_per_epoch=batches, accumulate=accumulate)
    return RunPlan(steps=steps, batch_size=int(bs), schedule=schedule, accumulate=accumulate, dataset_size=size,
                   batches_per_epoch=batches, drop_last=drop_last, shuffle=shuffle, iterable=iterable, notes=notes)
