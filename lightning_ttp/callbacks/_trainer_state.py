"""Reading what a Lightning ``Trainer`` is about to do, without changing it.

Everything here works for both Lightning namespaces (``pytorch_lightning`` and
``lightning.pytorch``): it only touches public Trainer attributes that the two share, and
imports Lightning helpers from the namespace the Trainer itself comes from.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, IterableDataset

from ..kernel.modes import preserve_module
from ..kernel.shard import Sharding
from ..pipeline.data import dataset_samples, loader_batch_size
from ..pipeline.plan import RunPlan, loader_shuffles
from ..pipeline.schedules import SchedulerSpec, hyper_schedule
from ._compat import is_instance

__all__ = [
    "lightning_namespace",
    "plan_from_trainer",
    "preserve_rng",
    "kernel_sharding",
    "preserve_state",
    "same_on_every_rank",
    "train_dataloader",
    "unsupported_strategy",
]

#: strategies whose parameters are sharded across processes
SHARDED_STRATEGIES = ("strategies.FSDPStrategy", "strategies.DeepSpeedStrategy", "strategies.ModelParallelStrategy")
#: data-parallel strategies (every process holds the whole model) across which the kernel is split:
#: ``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook`` and their ``find_unused_parameters`` variants
DATA_PARALLEL_STRATEGIES = ("strategies.DDPStrategy",)


def lightning_namespace(obj: Any) -> ModuleType:
    """``pytorch_lightning`` or ``lightning.pytorch``: the namespace ``obj``'s class is from."""
    module = type(obj).__module__
    name = "lightning.pytorch" if module.startswith("lightning.pytorch") else "pytorch_lightning"
    return importlib.import_module(name)


def unsupported_strategy(trainer: Any) -> str | None:
    """Why prediction cannot run under this Trainer's strategy (None if it can).

    Under FSDP, DeepSpeed and model parallelism the parameters are sharded across ranks: a
    forward/backward on rank zero alone (what the kernel needs) would deadlock or see partial
    weights.
    """
    if not is_instance(trainer.strategy, *SHARDED_STRATEGIES):
        return None
    return (
        f"the {type(trainer.strategy).__name__} strategy shards the model's parameters across processes, and the "
        "empirical NTK needs the full model on one process. Run the prediction once with strategy='ddp' (or a "
        "single device) on a subset, or call lightning_ttp.predict_training_time on the unsharded model before "
        "fitting."
    )


def kernel_sharding(trainer: Any) -> Sharding | None:
    """The :class:`~lightning_ttp.kernel.Sharding` of the kernel's samples across this Trainer's
    processes: under a data-parallel strategy with more than one process, the rank, the world
    size and the strategy's own ``all_gather`` on its root device; ``None`` otherwise (one
    process, or a strategy that shards the parameters: :func:`unsupported_strategy`)."""
    strategy = trainer.strategy
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world <= 1 or is_instance(strategy, *SHARDED_STRATEGIES) or not is_instance(strategy, *DATA_PARALLEL_STRATEGIES):
        return None
    return Sharding(int(trainer.global_rank), world, lambda t: strategy.all_gather(t), strategy.root_device)


def _fingerprint(batch: Any) -> str:
    """A digest of a batch's leaves (tensor bytes, shapes and dtypes; other leaves by ``repr``)."""
    digest = hashlib.sha256()
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(leaf, np.ndarray):
            digest.update(f"{leaf.shape}{leaf.dtype}".encode() + np.ascontiguousarray(leaf).tobytes())
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def same_on_every_rank(strategy: Any, batch: Any) -> tuple[Any, bool]:
    """``batch`` as rank zero holds it, on every rank, and whether it had to be sent: the kernel
    subset must be the same samples everywhere. A map-style dataset gives every rank the same
    seeded draw (:func:`lightning_ttp.pipeline.data.sample_subset` never touches the DistributedSampler),
    which a digest confirms; an ``IterableDataset`` that splits its stream by rank does not, and
    then rank zero's subset is broadcast. A collective: every rank calls it."""
    digest = _fingerprint(batch)
    same = strategy.reduce_boolean_decision(digest == strategy.broadcast(digest, src=0), all=True)
    return (batch, False) if same else (strategy.broadcast(batch, src=0), True)


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
    python, through Lightning's own helper), every submodule's train/eval mode, every buffer
    (BatchNorm running statistics and ``num_batches_tracked``, spectral-norm vectors, a custom
    layer's counters: values and identity), every parameter's ``requires_grad`` and ``.grad``,
    all restored on exit (also on error). The callbacks run every forward pass of theirs inside
    it (:func:`lightning_ttp.kernel.modes.preserve_module`; the plain-PyTorch twin is
    :func:`lightning_ttp.kernel.modes.untouched`)."""
    with preserve_rng(), preserve_module(module):
        yield


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
    rank_zero_warn("lightning_ttp: several training DataLoaders; predicting from the first one only.")
    return first


# --------------------------------------------------------------------------------------
# optimiser, schedule, steps
# --------------------------------------------------------------------------------------


def plan_from_trainer(trainer: Any, loader: DataLoader, steps_override: int | None = None) -> RunPlan:
    """The :class:`~lightning_ttp.pipeline.plan.RunPlan` of the fit the Trainer is about to run.

    Reads ``accumulate_grad_batches``, ``world_size``, ``num_training_batches``,
    ``estimated_stepping_batches`` (or ``steps_override``), the first optimiser and the lr
    schedulers with their ``interval``/``frequency`` (stepped on copies, with Lightning's
    semantics: :mod:`lightning_ttp.pipeline.schedules`). The RNG streams are restored afterwards:
    reading the first batch of a pre-batched loader draws from the global generators.
    """
    with preserve_rng():
        return _plan_from_trainer(trainer, loader, steps_override)


def _planned_steps(trainer: Any, steps_override: int | None, per_batch: int) -> int:
    """Planned steps of the first optimiser. Under manual optimisation with ``per_batch``
    optimisers, ``max_steps`` (and ``steps_override``) count Lightning's ``global_step``, which
    advances ``per_batch`` times per batch, while epochs count batches."""
    if steps_override is not None:
        return max(1, int(steps_override) // per_batch)
    if per_batch > 1:
        limits = []
        if trainer.max_steps not in (None, -1):
            limits.append(int(trainer.max_steps) // per_batch)
        batches = float(trainer.num_training_batches)
        if trainer.max_epochs not in (None, -1) and math.isfinite(batches):
            limits.append(int(trainer.max_epochs) * int(batches))
        if limits:
            return min(limits)
    estimated = trainer.estimated_stepping_batches
    if estimated is None or not math.isfinite(estimated) or estimated < 0:
        if not math.isfinite(float(trainer.num_training_batches)):
            reason = "the training data has no length (an IterableDataset) and Trainer(max_steps=...) is not set"
        elif any(is_instance(cb, "callbacks.Timer") for cb in trainer.callbacks):
            reason = "the Trainer stops on a time limit (max_time), not on a number of steps"
        else:
            reason = "the Trainer has neither max_steps nor a finite max_epochs"
        raise ValueError(f"the number of planned optimiser steps is unknown: {reason}. Set Trainer(max_steps=...) "
                         "or TrainingTimePredictor(steps=...).")
    return int(estimated)


def _plan_from_trainer(trainer: Any, loader: DataLoader, steps_override: int | None) -> RunPlan:
    notes: list[str] = []
    accumulate = int(trainer.accumulate_grad_batches)
    iterable = isinstance(loader.dataset, IterableDataset)
    batch_size = loader_batch_size(loader)
    if batch_size is None:
        first = next(iter(loader))
        data_utils = importlib.import_module(f"{lightning_namespace(trainer).__name__}.utilities.data")
        batch_size = int(data_utils.extract_batch_size(first))
        notes.append(f"batch size read from the first batch: {batch_size}.")
    dataset_size, counted = dataset_samples(loader)  # samples, not items, for pre-batched data
    if counted:
        notes.append(counted)
    num_batches = trainer.num_training_batches
    batches = int(num_batches) if num_batches is not None and math.isfinite(num_batches) and num_batches > 0 else None
    optimizers = trainer.optimizers
    if not optimizers:
        raise ValueError("the LightningModule configured no optimiser.")
    per_batch = 1
    if len(optimizers) > 1:
        notes.append(f"{len(optimizers)} optimisers; the prediction follows the first one.")
        if not getattr(trainer.lightning_module, "automatic_optimization", True):
            per_batch = len(optimizers)
            notes.append(f"manual optimisation: assuming each of the {per_batch} optimisers steps once per batch, "
                         f"so global_step advances {per_batch} per batch; steps are reported in global_step units.")
    steps = _planned_steps(trainer, steps_override, per_batch)
    if steps <= 0:
        raise ValueError(f"the Trainer plans {steps} optimiser steps; nothing to predict.")
    schedulers = [SchedulerSpec(c.scheduler, c.interval, int(c.frequency)) for c in trainer.lr_scheduler_configs
                  if c.scheduler is not None and not c.reduce_on_plateau]
    if any(c.reduce_on_plateau for c in trainer.lr_scheduler_configs):
        notes.append("ReduceLROnPlateau depends on future metrics; the learning rate is held constant.")
    schedule = hyper_schedule(optimizers[0], schedulers, steps, batches_per_epoch=batches, accumulate=accumulate)
    return RunPlan(steps=steps, batch_size=batch_size, schedule=schedule, accumulate=accumulate,
                   world_size=int(getattr(trainer, "world_size", 1) or 1), dataset_size=dataset_size,
                   batches_per_epoch=batches, drop_last=bool(getattr(loader, "drop_last", False)),
                   shuffle=loader_shuffles(loader), iterable=iterable, global_steps_per_step=per_batch, notes=notes)
