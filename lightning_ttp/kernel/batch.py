"""Batches as pytrees: count samples, slice them, add a batch dimension of one."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map


def batch_size(inputs: Any) -> int:
    """The shared leading dimension of every tensor in ``inputs`` (a tensor, tuple, list or dict)."""
    leaves = [leaf for leaf in tree_flatten(inputs)[0] if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise ValueError("`inputs` contains no tensor: pass a tensor, or a tuple/list/dict of tensors.")
    sizes = {leaf.shape[0] if leaf.dim() > 0 else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every tensor in `inputs` must have the same leading (sample) dimension; found {sorted(map(str, sizes))}."
        )
    return int(sizes.pop())


def index_batch(inputs: Any, index: slice | torch.Tensor) -> Any:
    """Samples ``index`` (a slice or an index tensor) of every tensor or numpy-array leaf with a
    sample axis; other leaves pass through."""
    return tree_map(lambda t: t[index] if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim > 0 else t, inputs)


def slice_batch(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor leaf; other leaves are passed through."""
    return index_batch(inputs, slice(start, stop))
