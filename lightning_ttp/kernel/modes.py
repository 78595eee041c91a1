"""Leaving the user's model exactly as it was (pure torch, no Lightning).

Every forward pass the package makes (the kernel, its probes, a cost pilot, the closed loop,
the give-up's own subset pass) runs inside :func:`untouched` (or, in the callbacks,
``lightning_ttp.callbacks._trainer_state.preserve_state``, the same guard with Lightning's RNG
helper). Whatever such a pass does — a BatchNorm in train mode updating its running statistics
and ``num_batches_tracked``, a spectral norm's power iteration, a custom counter buffer, a
dropout mask drawn from the global generator — is undone on exit, so a fit with our callbacks is
bit-identical to the same seeded fit without them.

What is restored: each submodule's ``.training`` flag (:func:`preserve_modes`), every buffer's
values and identity (:func:`preserve_buffers`), every parameter's ``requires_grad`` and
``.grad`` (:func:`preserve_parameters`), and the torch (CPU and CUDA), numpy and python random
streams (:func:`preserve_rng`). Not restored: plain Python attributes a module mutates in its
``forward`` (they are not part of its ``state_dict``; ``docs/limits.md``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = [
    "preserve_buffers",
    "preserve_modes",
    "preserve_module",
    "preserve_optimizer",
    "preserve_parameter_values",
    "preserve_parameters",
    "preserve_rng",
    "untouched",
]


@contextmanager
def preserve_modes(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``.training`` flag on exit (also on error).

    ``module.train(was_training)`` is not enough: it sets the flag on *every* submodule, so
    a submodule the user had put in eval mode (e.g. a frozen BatchNorm) would become
    trainable. Here each module gets back its own flag; ``train()``/``eval()`` are not
    called on exit, so user overrides of them are not triggered.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def preserve_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of every submodule on exit (also on error): its values, copied back
    in place with ``copy_`` (so optimisers, hooks and views that hold the tensor see the old
    values), and the tensor object itself where a forward pass rebound the attribute.

    Covers BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``, spectral-norm
    vectors and any buffer a custom layer updates in ``forward``. Costs one copy of the buffers
    (not of the parameters).
    """
    saved = [(m, name, buf, buf.detach().clone())
             for m in module.modules() for name, buf in m._buffers.items() if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, buf, copy in saved:
                m._buffers[name] = buf
                buf.copy_(copy)


@contextmanager
def preserve_parameters(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` flag and ``.grad`` tensor on exit (also on error)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


@contextmanager
def preserve_parameter_values(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's values on exit (also on error), copied back in place: for the one
    pass of ours that trains (the look-ahead, :mod:`lightning_ttp.pipeline.lookahead`). Costs one copy of
    the parameters."""
    saved = [(p, p.detach().clone()) for p in module.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


@contextmanager
def preserve_optimizer(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Restore an optimiser's state (its tensors cloned, put back; entries created inside dropped)
    and its param groups' values (lr and the like) on exit (also on error)."""
    state = {p: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        yield
    finally:
        optimizer.state.clear()
        optimizer.state.update(state)
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update(saved)


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore the torch (CPU and every initialised CUDA device), numpy (legacy global) and python
    ``random`` streams on exit (also on error)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    numpy_state = np.random.get_state()  # noqa: NPY002 (the legacy global stream users seed)
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)


@contextmanager
def preserve_module(module: nn.Module) -> Iterator[None]:
    """:func:`preserve_modes`, :func:`preserve_buffers` and :func:`preserve_parameters` in one:
    the module's whole mutable state except its parameter values (which no pass of ours writes)."""
    with preserve_parameters(module), preserve_buffers(module), preserve_modes(module):
        yield


@contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """:func:`preserve_module` and :func:`preserve_rng`: after the block the model and the random
    streams are as they were, whatever forward passes (train or eval mode) ran inside it."""
    with preserve_rng(), preserve_module(module):
        yield
