"""Reading what a Lightning ``Trainer`` is about to do, without changing it.

Everything here works for both Lightning namespaces (``pytorch_lightning`` and
``lightning.pytorch``): it only touches public Trainer attributes that the two share, and
imports Lightning helpers from the namespace the Trainer itself comes from.
"""

from __future__ import annotations

import copy
import importlib
import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .._modes import preserve_modes

__all__ = [
    "TrainingPlan",
    "collect_plan",
    "lightning_namespace",
    "lr_schedule_for_trainer",
    "preserve_rng",
    "preserve_state",
    "sample_training_subset",
    "unsupported_strategy",
]


def lightning_namespace(obj: Any) -> ModuleType:
    """``pytorch_lightning`` or ``lightning.pytorch``: the namespace ``obj``'s class is from."""
    module = type(obj).__module__
    name = "lightning.pytorch" if module.startswith("lightning.pytorch") else "pytorch_lightning"
    return importlib.import_module(name)


def unsupported_strategy(trainer: Any) -> str | None:
    """Why prediction cannot run under this Trainer's strategy (None if it can).

    Under FSDP and DeepSpeed the parameters are sharded across ranks: a forward/backward
    on rank zero alone (what the kernel needs) would deadlock or see partial weights.
    """
    name = type(trainer.strategy).__name__
    lowered = name.lower()
    if "fsdp" in lowered or "deepspeed" in lowered or "modelparallel" in lowered:
        return (
            f"the {name} strategy shards the model's parameters across processes, and the "
            "empirical NTK needs the full model on one process. Run the prediction once with "
            "strategy='ddp' (or a single device) on a subset, or call "
            "lightning_ttp.predict_training_time on the unsharded model before fitting."
        )
    return None


# --------------------------------------------------------------------------------------
# state preservation
# --------------------------------------------------------------------------------------


def _collect_rng_states() -> dict[str, Any]:
    try:  # Lightning's own helper, when the installed version still has it
        from lightning_fabric.utilities.seed import _collect_rng_states

        return {"lightning": _collect_rng_states(include_cuda=True)}
    except Exception:  # pragma: no cover - older/newer Lightning
        states: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),  # noqa: NPY002 (the legacy global stream users seed)
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["torch.cuda"] = torch.cuda.get_rng_state_all()
        return states


def _set_rng_states(states: dict[str, Any]) -> None:
    if "lightning" in states:
        from lightning_fabric.utilities.seed import _set_rng_states

        _set_rng_states(states["lightning"])
        return
    torch.set_rng_state(states["torch"])  # pragma: no cover
    np.random.set_state(states["numpy"])  # noqa: NPY002  # pragma: no cover
    random.setstate(states["python"])  # pragma: no cover
    if "torch.cuda" in states:  # pragma: no cover
        torch.cuda.set_rng_state_all(states["torch.cuda"])


@contextmanager
def preserve_state(module: torch.nn.Module) -> Iterator[None]:
    """Leave the user's training exactly as it was: RNG streams (torch CPU/CUDA, numpy,
    python), every submodule's train/eval mode, every parameter's ``requires_grad`` and
    ``.grad``, all restored on exit (also on error)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        with preserve_rng(), preserve_modes(module):
            yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore the torch (CPU/CUDA), numpy and python RNG streams on exit (also on error)."""
    rng = _collect_rng_states()
    try:
        yield
    finally:
        _set_rng_states(rng)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def train_dataloader(trainer: Any) -> DataLoader:
    """The training DataLoader Lightning will use, loaded once via
    ``trainer.fit_loop.setup_data()`` (Lightning reuses it afterwards, it is not rebuilt).
    With several training loaders (a CombinedLoader) the first one is used."""
    trainer.fit_loop.setup_data()
    loaders = trainer.train_dataloader
    if loaders is None:
        raise RuntimeError("the Trainer has no training DataLoader (fit was called without training data?).")
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        first = next(iter(loaders.values()))
    elif isinstance(loaders, Sequence):
        first = loaders[0]
    else:
        flattened = getattr(loaders, "flattened", None)
        if not flattened:
            raise TypeError(f"unsupported training data of type {type(loaders).__name__}.")
        first = flattened[0]
    warnings.warn(
        "lightning_ttp: several training DataLoaders; predicting from the first one only.",
        stacklevel=2,
    )
    return first


def loader_batch_size(loader: DataLoader) -> int | None:
    """Samples per batch of a DataLoader (None when it yields pre-batched data)."""
    if loader.batch_size is not None:
        return int(loader.batch_size)
    sampler = getattr(loader, "batch_sampler", None)
    size = getattr(sampler, "batch_size", None)
    return int(size) if size is not None else None


def _concat(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches, dim=0)
    if isinstance(first, np.ndarray):
        return np.concatenate(batches, axis=0)
    if isinstance(first, Mapping):
        return type(first)({k: _concat([b[k] for b in batches]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # namedtuple
        return type(first)(*(_concat([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, (int, float, str)) or first is None:
        return first
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def _slice(batch: Any, n: int) -> Any:
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[:n]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, n) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, n) for v in batch)
    return batch


def _batch_len(batch: Any) -> int:
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    raise TypeError(f"cannot tell the batch size of {type(batch).__name__}")


def sample_training_subset(loader: DataLoader, num_samples: int, seed: int) -> tuple[Any, int]:
    """A fixed, seeded subset of the training data as one collated batch.

    Map-style datasets: ``num_samples`` indices drawn without replacement by a private
    ``torch.Generator(seed)`` and collated with the loader's own ``collate_fn`` — the
    loader is not iterated, so its sampler and workers are untouched.
    ``IterableDataset``: the first ``num_samples`` examples of a fresh iterator over the
    loader (the dataset must be re-iterable; streams that cannot restart should pass an
    explicit subset to :func:`lightning_ttp.predict_training_time` instead).

    Returns the batch and the number of samples in it.
    """
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(
        dataset, "__getitem__"
    ):
        size = len(dataset)  # type: ignore[arg-type]
        if size == 0:
            raise ValueError("the training dataset is empty.")
        n = min(num_samples, size)
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(size, generator=generator)[:n].tolist()
        collate = loader.collate_fn
        if loader_batch_size(loader) is None:  # auto-batching disabled: collate ourselves
            collate = torch.utils.data.default_collate
        return collate([dataset[i] for i in indices]), n
    batches, count = [], 0
    for batch in loader:
        batches.append(batch)
        count += _batch_len(batch)
        if count >= num_samples:
            break
    if not batches:
        raise ValueError("the training IterableDataset yielded no data.")
    batch = _concat(batches)
    n = min(count, num_samples)
    return _slice(batch, n), n


# --------------------------------------------------------------------------------------
# optimiser, schedule, steps
# --------------------------------------------------------------------------------------


def _dummy_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An SGD optimiser over one scalar per param group, with copies of the groups'
    hyper-parameters: a scheduler deep-copied onto it can be stepped freely."""
    groups = []
    for group in optimizer.param_groups:
        g = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        g["params"] = [torch.nn.Parameter(torch.zeros(1))]
        groups.append(g)
    dummy = torch.optim.SGD(groups, lr=optimizer.param_groups[0]["lr"])
    # SGD's constructor filled defaults; put back the original groups' values verbatim
    for g, original in zip(dummy.param_groups, optimizer.param_groups):
        for k, v in original.items():
            if k != "params":
                g[k] = copy.deepcopy(v)
    return dummy


def lr_schedule_for_trainer(
    optimizer: torch.optim.Optimizer,
    scheduler_configs: Sequence[Any],
    steps: int,
    steps_per_epoch: int | None,
) -> tuple[np.ndarray, list[str]]:
    """Learning rate of every param group at every optimiser step ``0..steps-1``, as
    Lightning will step the user's schedulers (``interval`` "step" or "epoch",
    ``frequency``), computed on copies: the user's scheduler and optimiser are untouched.

    Returns ``(lrs of shape (steps, num_groups), notes)``. ``ReduceLROnPlateau`` depends on
    metrics not known in advance: it is held constant (and noted).
    """
    notes: list[str] = []
    base = np.array([g["lr"] for g in optimizer.param_groups], dtype=np.float64)
    lrs = np.tile(base, (steps, 1))
    configs = [c for c in scheduler_configs if getattr(c, "scheduler", None) is not None]
    if not configs:
        return lrs, notes
    dummy = _dummy_optimizer(optimizer)
    memo = {id(optimizer): dummy}
    copies = []
    for config in configs:
        scheduler = config.scheduler
        if getattr(config, "reduce_on_plateau", False) or type(scheduler).__name__ == "ReduceLROnPlateau":
            notes.append("ReduceLROnPlateau depends on future metrics; the learning rate is held constant.")
            continue
        if getattr(scheduler, "optimizer", None) is not optimizer:
            notes.append(f"{type(scheduler).__name__} is not attached to the first optimiser; ignored.")
            continue
        interval = getattr(config, "interval", "epoch")
        if interval == "epoch" and not steps_per_epoch:
            notes.append(
                f"{type(scheduler).__name__} steps per epoch but the epoch length is unknown "
                "(iterable data); the learning rate is held constant."
            )
            continue
        copies.append((copy.deepcopy(scheduler, memo), interval, max(1, int(getattr(config, "frequency", 1)))))
    if not copies:
        return lrs, notes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            lrs[t] = [g["lr"] for g in dummy.param_groups]
            for scheduler, interval, frequency in copies:
                if interval == "step":
                    if (t + 1) % frequency == 0:
                        scheduler.step()
                else:
                    assert steps_per_epoch
                    if (t + 1) % steps_per_epoch == 0 and ((t + 1) // steps_per_epoch) % frequency == 0:
                        scheduler.step()
    return lrs, notes


@dataclass
class TrainingPlan:
    """What the Trainer is about to do, in optimiser steps (after gradient accumulation).

    Attributes:
        steps: planned optimiser steps (``trainer.estimated_stepping_batches`` or override).
        batch_size: samples per micro-batch on one process.
        accumulate: ``accumulate_grad_batches``.
        world_size: number of data-parallel processes.
        effective_batch_size: ``batch_size * accumulate * world_size`` samples per step.
        dataset_size: training samples per epoch over all processes (None if unknown).
        steps_per_epoch: optimiser steps per epoch (None if unknown).
        lr_schedule: ``(steps, num_groups)`` learning rates per step.
        drop_last: whether the loader drops the last incomplete batch.
        iterable: the data is an ``IterableDataset``.
        shuffle: the loader reshuffles every epoch (random or distributed-shuffled sampler).
        notes: things the prediction had to assume.
    """

    steps: int
    batch_size: int
    accumulate: int
    world_size: int
    effective_batch_size: int
    dataset_size: int | None
    steps_per_epoch: int | None
    lr_schedule: np.ndarray
    drop_last: bool
    iterable: bool
    shuffle: bool = True
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
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
        }


def _shuffles(loader: DataLoader) -> bool:
    if isinstance(loader.dataset, IterableDataset):
        return False
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.SequentialSampler):
        return False
    return bool(getattr(sampler, "shuffle", True))


def collect_plan(trainer: Any, loader: DataLoader, steps_override: int | None = None) -> TrainingPlan:
    """Read the planned optimiser steps, batch sizes and learning-rate schedule.

    The RNG streams are restored afterwards: reading the first batch of a pre-batched loader
    (``batch_size=None``) draws the loader's base seed from the global torch generator (and a
    user's dataset may draw from numpy/python), which would otherwise change the training.
    """
    with preserve_rng():
        return _collect_plan(trainer, loader, steps_override)


def _collect_plan(trainer: Any, loader: DataLoader, steps_override: int | None) -> TrainingPlan:
    notes: list[str] = []
    accumulate = int(trainer.accumulate_grad_batches)
    world_size = int(getattr(trainer, "world_size", 1) or 1)
    dataset = loader.dataset
    iterable = isinstance(dataset, IterableDataset)
    batch_size = loader_batch_size(loader)
    if batch_size is None:
        first = next(iter(loader))
        data_utils = importlib.import_module(f"{lightning_namespace(trainer).__name__}.utilities.data")
        batch_size = int(data_utils.extract_batch_size(first))
        notes.append(f"batch size read from the first batch: {batch_size}.")
    dataset_size = None
    if not iterable and hasattr(dataset, "__len__"):
        dataset_size = len(dataset)  # type: ignore[arg-type]
    num_batches = trainer.num_training_batches
    steps_per_epoch = None
    if num_batches is not None and math.isfinite(num_batches) and num_batches > 0:
        steps_per_epoch = max(1, math.ceil(int(num_batches) / accumulate))
    if steps_override is not None:
        steps = int(steps_override)
    else:
        estimated = trainer.estimated_stepping_batches
        if estimated is None or not math.isfinite(estimated):
            raise ValueError(
                "the number of planned optimiser steps is unknown (an IterableDataset without "
                "`max_steps`). Set Trainer(max_steps=...) or TrainingTimePredictor(steps=...)."
            )
        steps = int(estimated)
    if steps <= 0:
        raise ValueError(f"the Trainer plans {steps} optimiser steps; nothing to predict.")
    optimizers = trainer.optimizers
    if not optimizers:
        raise ValueError("the LightningModule configured no optimiser.")
    if len(optimizers) > 1:
        notes.append(f"{len(optimizers)} optimisers; the prediction follows the first one.")
    lr_schedule, lr_notes = lr_schedule_for_trainer(
        optimizers[0], trainer.lr_scheduler_configs, steps, steps_per_epoch
    )
    notes.extend(lr_notes)
    return TrainingPlan(
        steps=steps,
        batch_size=batch_size,
        accumulate=accumulate,
        world_size=world_size,
        effective_batch_size=batch_size * accumulate * world_size,
        dataset_size=dataset_size,
        steps_per_epoch=steps_per_epoch,
        lr_schedule=lr_schedule,
        drop_last=bool(getattr(loader, "drop_last", False)),
        iterable=iterable,
        shuffle=_shuffles(loader),
        notes=notes,
    )
