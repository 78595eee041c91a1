"""Train/eval modes of a module tree, saved and restored exactly (pure torch, no Lightning)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["preserve_modes"]


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
