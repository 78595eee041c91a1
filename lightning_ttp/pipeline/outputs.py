"""The model's outputs as the loss sees them: one (N, C) row per sample (pure torch, no Lightning).

:func:`model_outputs` (and :class:`OutputModule`, the same as a module for ``torch.func``) is the
one forward every kernel, probe and closed-loop pass of the pipeline runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from .data import logits_of

__all__ = ["OutputModule", "flat_output_fn", "model_outputs"]


def model_outputs(model: torch.nn.Module, inputs: Any, output_fn: Callable | None = None) -> torch.Tensor:
    """The (N, C) outputs the loss sees: ``output_fn(model, inputs)`` or the logits of
    ``model(inputs)`` (:func:`lightning_ttp.pipeline.data.logits_of`), flattened to one row per sample."""
    out = output_fn(model, inputs) if output_fn is not None else logits_of(model(inputs))
    if not isinstance(out, torch.Tensor):
        out = logits_of(out)
    return out[:, None] if out.dim() == 1 else out.reshape(out.shape[0], -1)


class OutputModule(torch.nn.Module):
    """:func:`model_outputs` as a module (the model as its submodule ``m``), so
    ``torch.func.functional_call`` can swap the weights."""

    def __init__(self, model: torch.nn.Module, output_fn: Callable | None) -> None:
        super().__init__()
        self.m = model
        self.fn = output_fn

    def forward(self, inputs):
        return model_outputs(self.m, inputs, self.fn)


def flat_output_fn(output_fn: Callable | None) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    """``(model, inputs) -> (N, C)`` outputs as :func:`model_outputs` gives them, as a
    ``functools.partial`` (the kernel engine's probe cache recognises it across calls)."""
    return partial(_outputs_with, output_fn=output_fn)


def _outputs_with(model: torch.nn.Module, inputs: Any, *, output_fn: Callable | None) -> torch.Tensor:
    return model_outputs(model, inputs, output_fn)
