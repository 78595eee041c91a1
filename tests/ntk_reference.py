"""Independent reference: the empirical NTK by torch.func.vmap(jacrev) + contraction (the PyTorch tutorial method)."""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map


def reference_jacobian(model, inputs, output_fn=None) -> torch.Tensor:
    """J (N, C, D) over trainable parameters, the model in eval mode (its mode is restored)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    was_training = {m: m.training for m in model.modules()}
    model.eval()

    def single(p, sample):
        batch = tree_map(lambda t: t.unsqueeze(0), sample)
        if output_fn is None:
            return functional_call(model, p, (batch,))[0]

        class Swapped(torch.nn.Module):
            def forward(self, b):
                return functional_call(model, p, (b,))

        return output_fn(Swapped(), batch)[0]

    try:
        jac = vmap(jacrev(single), in_dims=(None, 0))(params, inputs)
    finally:
        for m, mode in was_training.items():
            m.training = mode
    first = next(iter(jac.values()))
    return torch.cat([j.reshape(first.shape[0], first.shape[1], -1) for j in jac.values()], dim=-1)


def reference_ntk(model, inputs, output_fn=None, kernel="full") -> torch.Tensor:
    jac = reference_jacobian(model, inputs, output_fn)
    n, c, d = jac.shape
    if kernel == "trace":
        return torch.einsum("icd,jcd->ij", jac, jac)
    flat = jac.reshape(n * c, d)
    return flat @ flat.T


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()
