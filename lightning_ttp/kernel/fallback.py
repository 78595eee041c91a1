"""Generic per-sample gradients for parameters no fast path covers.

Custom modules, parameters used outside their module's ``forward`` (``nn.MultiheadAttention``'s
``in_proj_weight``), tied weights and modules called more than once end up here. We use
``torch.func.vmap(jacrev(...))`` over samples; where vmap cannot run the model (data-dependent
control flow, ``.item()``, non-tensor inputs) an autograd loop over samples and outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map

from lightning_ttp.kernel.batch import batch_size, slice_batch


class ForwardFn(nn.Module):
    """``output_fn(model, inputs)`` (or ``model(inputs)``) as a module, so ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, output_fn: Callable[[nn.Module, Any], torch.Tensor] | None):
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, inputs: Any) -> torch.Tensor:
        if self.output_fn is None:
            return self.model(inputs)
        return self.output_fn(self.model, inputs)


def _flatten(per_param: list[torch.Tensor], n: int, c: int) -> torch.Tensor:
    return torch.cat([g.reshape(n, c, -1) for g in per_param], dim=-1)


def _jacobian_vmap(forward: ForwardFn, names: list[str], params: list[nn.Parameter], inputs: Any) -> torch.Tensor:
    primals = {name: p.detach() for name, p in zip(names, params)}

    def single(weights: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        batch = tree_map(lambda t: t.unsqueeze(0), sample)
        return functional_call(forward, weights, (batch,))[0]

    jac = vmap(jacrev(single), in_dims=(None, 0))(primals, inputs)
    first = jac[names[0]]
    return _flatten([jac[name] for name in names], first.shape[0], first.shape[1])


def _jacobian_loop(forward: ForwardFn, params: list[nn.Parameter], inputs: Any) -> torch.Tensor:
    rows = []
    for i in range(batch_size(inputs)):
        out = forward(slice_batch(inputs, i, i + 1))
        c = out.shape[1]
        per_output = []
        for k in range(c):
            grads = torch.autograd.grad(out[0, k], params, retain_graph=k < c - 1, allow_unused=True)
            grads = [_dense(g, p) for p, g in zip(params, grads)]
            per_output.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def _dense(grad: torch.Tensor | None, param: nn.Parameter) -> torch.Tensor:
    """A strided gradient: zeros for an unused parameter, dense for a ``sparse=True`` embedding."""
    if grad is None:
        return torch.zeros_like(param)
    return grad.to_dense() if grad.is_sparse else grad


def per_sample_jacobian(
    forward: ForwardFn, names: list[str], params: list[nn.Parameter], inputs: Any
) -> tuple[torch.Tensor, str]:
    """J (n, C, D): ∂f_c(x_i)/∂w for the given parameters, and which method produced it."""
    try:
        return _jacobian_vmap(forward, names, params, inputs), "vmap"
    except Exception:  # noqa: BLE001 - any failure of vmap means: use the loop, which always works
        return _jacobian_loop(forward, params, inputs), "loop"
