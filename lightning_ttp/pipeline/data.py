"""Training data as the prediction and the give-up see it: one module, one set of conventions.

- :func:`sample_subset` draws the fixed, seeded kernel subset from a ``DataLoader`` (the same
  samples whether :func:`lightning_ttp.predict_training_time` or the Lightning callback asks).
- :func:`split_batch` splits a collated batch into what the model (or ``output_fn``) receives
  and the targets, with one convention for every caller.
- :func:`logits_of` takes the logits out of a model's output (a tensor, a tuple, a dict or a
  HuggingFace-style ``ModelOutput``).
- :func:`concat_batches` / :func:`take` / :func:`num_samples_in` treat a batch as a pytree.

Pure torch: no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, IterableDataset

from ..kernel.batch import index_batch, slice_batch

__all__ = [
    "concat_batches",
    "dataset_samples",
    "loader_batch_size",
    "logits_of",
    "num_samples_in",
    "sample_subset",
    "split_batch",
    "take",
]

OutputFn = Callable[[Any, Any], Any]
TargetFn = Callable[[Any], Any]

_BATCH_CONVENTION = (
    "batches are (inputs, targets, ...) sequences or dicts with 'x' and 'y' keys; the model is called as "
    "model(inputs)"
)


def _is_array(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def num_samples_in(batch: Any) -> int:
    """The leading (sample) dimension of the first tensor or array of ``batch``."""
    for leaf in tree_flatten(batch)[0]:
        if _is_array(leaf) and leaf.ndim > 0:
            return int(leaf.shape[0])
    raise TypeError(f"cannot tell the number of samples of a batch of type {type(batch).__name__}: it holds no tensor")


def take(batch: Any, n: int) -> Any:
    """The first ``n`` samples of every tensor/array leaf of ``batch``; other leaves unchanged."""
    return slice_batch(batch, 0, n)


def concat_batches(batches: list[Any]) -> Any:
    """Concatenate collated batches of the same structure along the sample axis.

    Tensors and arrays are concatenated; any other leaf (a string, a flag) is taken from the
    first batch.
    """
    if not batches:
        raise ValueError("no batches to concatenate")
    flat, spec = tree_flatten(batches[0])
    columns = [tree_flatten(b)[0] for b in batches]
    if any(len(c) != len(flat) for c in columns):
        raise TypeError("cannot concatenate batches of different structures")
    leaves = []
    for i, first in enumerate(flat):
        parts = [c[i] for c in columns]
        if isinstance(first, torch.Tensor) and first.ndim > 0:
            leaves.append(torch.cat(parts))
        elif isinstance(first, np.ndarray) and first.ndim > 0:
            leaves.append(np.concatenate(parts))
        else:
            leaves.append(first)
    return tree_unflatten(leaves, spec)


def loader_batch_size(loader: DataLoader) -> int | None:
    """Samples per batch of a DataLoader (None when it yields pre-batched data)."""
    if loader.batch_size is not None:
        return int(loader.batch_size)
    size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if size is not None else None


def dataset_samples(loader: DataLoader) -> tuple[int | None, str | None]:
    """Training samples in one pass over a map-style ``loader``'s dataset, and a note when they
    had to be counted from its items: ``(None, None)`` for a dataset without ``len()`` or an
    ``IterableDataset``.

    With a batch size, ``len(dataset)`` counts samples. A ``DataLoader(dataset, batch_size=None)``
    yields the dataset's items as they are, so each item is a batch and the samples are the items'
    leading dimensions: (items − 1) × the first item's + the last item's (exact when every item but
    the last is full, as pre-batching with a fixed batch size gives; two items are read, not all).
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return None, None
    items = len(dataset)  # type: ignore[arg-type]
    if loader_batch_size(loader) is not None or items == 0 or not hasattr(dataset, "__getitem__"):
        return items, None
    first = num_samples_in(dataset[0])
    last = num_samples_in(dataset[items - 1]) if items > 1 else first
    size = (items - 1) * first + last
    return size, (f"pre-batched data set: {items} items of {first} samples"
                  f"{'' if last == first else f' (the last of {last})'} read as {size} samples.")


def sample_subset(loader: DataLoader | tuple[Any, Any], num_samples: int, seed: int) -> tuple[Any, int]:
    """A fixed, seeded subset of the training data as one collated batch: ``(batch, n)``.

    An ``(inputs, targets)`` pair is indexed like a map-style dataset of its samples (so a
    pair and a ``DataLoader(TensorDataset(inputs, targets))`` give the same subset).

    Map-style datasets: ``min(num_samples, len(dataset))`` indices drawn without replacement by
    a private ``torch.Generator(seed)``, kept in dataset order, and collated with the loader's own ``collate_fn``; the
    loader is not iterated, so its sampler, workers and the global RNG are untouched. A
    dataset of pre-batched items (``batch_size=None``) is read item by item until
    ``num_samples`` samples are gathered. ``IterableDataset``: the first ``num_samples``
    samples of a fresh iterator over the loader (the dataset must be re-iterable; for a
    stream that cannot restart, pass an explicit ``(inputs, targets)`` subset instead).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if isinstance(loader, (list, tuple)) and len(loader) == 2 and not isinstance(loader, DataLoader):
        size = num_samples_in(loader[0])
        if size == 0:
            raise ValueError("the data is empty (0 samples)")
        order = _subset_indices(size, num_samples, seed)
        inputs, targets = loader
        targets = torch.as_tensor(targets)
        if targets.shape[0] != size:
            raise ValueError(f"inputs have {size} samples but targets have {targets.shape[0]}")
        return (index_batch(inputs, order), targets[order]), len(order)
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        size = len(dataset)  # type: ignore[arg-type]
        if size == 0:
            raise ValueError("the training dataset is empty")
        if loader_batch_size(loader) is not None:
            indices = _subset_indices(size, num_samples, seed).tolist()
            return loader.collate_fn([dataset[i] for i in indices]), len(indices)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        return _gather((dataset[i] for i in order), num_samples)  # pre-batched items
    with torch.random.fork_rng(devices=[]):  # iterating may draw from the global RNG
        return _gather(iter(loader), num_samples)


def _subset_indices(size: int, num_samples: int, seed: int) -> torch.Tensor:
    """``min(num_samples, size)`` distinct indices drawn by ``torch.Generator(seed)``, in dataset
    order (so a subset that covers the dataset is the dataset, in the order an unshuffled loader
    visits it)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: min(num_samples, size)]
    return order.sort().values


def _gather(batches: Any, num_samples: int) -> tuple[Any, int]:
    taken, count = [], 0
    for batch in batches:
        taken.append(batch)
        count += num_samples_in(batch)
        if count >= num_samples:
            break
    if not taken:
        raise ValueError("the training data yielded no samples")
    n = min(count, num_samples)
    return take(concat_batches(taken), n), n


def split_batch(batch: Any, *, output_fn: OutputFn | None = None, target_fn: TargetFn | None = None,
                who: str = "lightning_ttp") -> tuple[Any, Any]:
    """``(inputs, targets)`` of a collated batch, the one convention of the package.

    - targets: ``target_fn(batch)`` if given, else ``batch[1]`` of an ``(x, y, ...)`` sequence,
      else ``batch["y"]`` of a mapping;
    - inputs (what the model, or ``output_fn``, receives): the whole batch when ``output_fn`` is
      given (``output_fn(model, batch)``, like a ``training_step``), else ``batch[0]`` /
      ``batch["x"]``.

    Raises a ``TypeError`` that names the callables to pass when the batch does not follow the
    convention.
    """
    targets = target_fn(batch) if target_fn is not None else _part(batch, 1, "targets", who)
    inputs = batch if output_fn is not None else _part(batch, 0, "model inputs", who)
    return inputs, targets


def _part(batch: Any, index: int, what: str, who: str) -> Any:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[index]
    if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
        return batch["xy"[index]]
    fix = "output_fn=lambda model, batch: model(...) and target_fn=lambda batch: ..."
    if index == 1 and isinstance(batch, (list, tuple)):
        fix = "target_fn=lambda batch: ..."
    raise TypeError(
        f"{who} cannot find the {what} in a batch of type {type(batch).__name__}: by default {_BATCH_CONVENTION}. "
        f"Pass {fix}."
    )


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model's output.

    A tensor is returned as is; a HuggingFace-style ``ModelOutput`` or any object with a
    ``logits`` tensor attribute gives ``.logits``; a mapping gives ``["logits"]``; a tuple or
    list gives its first tensor. Anything else raises a ``TypeError`` that names ``output_fn``.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(
        f"cannot find the logits in a model output of type {type(output).__name__}: return a tensor, a tuple whose "
        "first tensor is the logits, a dict with 'logits', or pass output_fn=lambda model, batch: <(N, C) logits>."
    )
