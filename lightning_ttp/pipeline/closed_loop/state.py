"""Steps 1 and 3 of the closed loop: the state of the run at step k, in function space.

The kernel re-estimated at the current weights w_k on the same subset (eval mode, or the subset
as one training batch for BatchNorm in train mode: :mod:`lightning_ttp.pipeline.batch_statistics`),
the outputs f_k, and the optimiser state carried into function space: the images B_g = J_g b_g of
SGD's momentum buffers, or B_g = J_g P_k m_g of Adam's first moment with P_k from its own second
moment, each by one ``torch.func.jvp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...dynamics import OptimizerSpec
from ...kernel.batch import batch_size as _num_samples
from ...kernel.shard import Sharding, map_rows
from ..batch_statistics import batch_statistics_state
from ..estimate import ADAM_V_FLOOR, KernelEstimate, estimate_kernel
from ..outputs import OutputModule

FROZEN_RMS = 1e-4  # Adam: a tensor whose rms √v̂ is below this × the median tensor's gets no gradient


def _own_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's buffers, made inside a ``torch.func`` transform: a layer that updates a
    buffer in place in ``forward`` (a counter, a spectral norm's vectors) then writes to the copy,
    which the transform allows (it refuses to mutate a tensor captured from outside)."""
    return {name: b.clone() for name, b in module.named_buffers()}


def _eval_jvp(module: torch.nn.Module, inputs: Any, params: list[torch.nn.Parameter],
              tangents: list[torch.Tensor]) -> torch.Tensor:
    """J · v for the outputs of ``module`` (eval mode, restored) w.r.t. ``params``, as float64 (N, C)."""
    from torch.func import functional_call, jvp

    names = {id(p): n for n, p in module.named_parameters()}
    primal = {names[id(p)]: p.detach() for p in params}
    tangent = {names[id(p)]: v.detach().to(p.dtype) for p, v in zip(params, tangents, strict=True)}
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            out = jvp(lambda w: functional_call(module, {**w, **_own_buffers(module)}, (inputs,), strict=False),
                      (primal,), (tangent,))[1]
    finally:
        for m, flag in flags.items():
            m.training = flag
    return out.detach().to(torch.float64).cpu()


def _buffers(module: torch.nn.Module, inputs: Any, groups: list[list[torch.nn.Parameter]],
             tangent: Callable[[torch.nn.Parameter], torch.Tensor | None],
             sharding: Sharding | None = None) -> list[torch.Tensor | None]:
    """Per group J_g · v_g with v = ``tangent(p)`` (zeros where None; None for a group without any);
    with a ``sharding``, each process's rows only, gathered."""
    def images(part: Any) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for group in groups:
            vs = [tangent(p) for p in group]
            if all(v is None for v in vs):
                out.append(None)
                continue
            vs = [torch.zeros_like(p) if v is None else v for p, v in zip(group, vs, strict=True)]
            out.append(_eval_jvp(module, part, group, vs))
        return out

    return map_rows(sharding, images, inputs, _num_samples(inputs))


def _current_state(model, inputs, targets, spec: OptimizerSpec, optimizer: torch.optim.Optimizer, *, loss,
                   output_fn, kernel: str, projection_dim: int | None, seed: int,
                   reference: KernelEstimate | None = None,
                   sharding: Sharding | None = None) -> tuple[KernelEstimate, list, int]:
    """The kernel estimate at w_k (with J_g w_{k,g} under weight decay), the buffer images and Adam's step.

    SGD: the kernel of the model's param groups, B_g = J_g b_g from ``momentum_buffer``.
    Adam(W): the kernel of w = w_k + s ⊙ z with s = (√v̂_k + ε)^{-1/2} from the optimiser's
    ``exp_avg_sq`` (v̂ bias-corrected and floored at ``ADAM_V_FLOOR`` × its tensor mean like the
    fit-start kernel: a coordinate whose batch gradients cancel has a tiny v̂ but not a tiny
    Jacobian; tensors without state or whose rms √v̂ is below ``FROZEN_RMS`` × the median
    tensor's — no gradient reaches them in training, e.g. a bias before BatchNorm — are frozen,
    s = 0) and B_g = J_g diag(s²) m_g = J_{z,g} (s ⊙ m_g) from ``exp_avg``.
    With a ``reference`` (the fit-start estimate on the same subset) the subset is one training
    batch (BatchNorm on its statistics, :func:`batch_statistics_state`) instead of eval mode. A
    ``sharding`` splits the subset's samples across processes for the kernel, the Jacobian's rows
    and the buffer images alike (:class:`lightning_ttp.kernel.Sharding`: a collective).
    """
    groups = [list(g) for g in spec.params]
    state = optimizer.state
    forward = OutputModule(model, output_fn)
    batch_statistics = reference is not None
    if batch_statistics and spec.kind not in ("adam", "adamw"):
        tangents = {id(p): state[p]["momentum_buffer"].detach() for g in groups for p in g
                    if state.get(p, {}).get("momentum_buffer") is not None}
        out, grams, bufs, jw = batch_statistics_state(model, inputs, groups, kernel=kernel, scales=None,
                                                       tangents=tangents, weight_decay=spec.has_weight_decay,
                                                       output_fn=output_fn, sharding=sharding)
        return _estimate(out, reference, grams, jw), bufs, 0
    if spec.kind not in ("adam", "adamw"):
        ke = estimate_kernel(model, inputs, targets, spec, loss=loss, output_fn=output_fn, kernel=kernel,
                             projection_dim=projection_dim, seed=seed, batch_statistics=False, sharding=sharding)
        bufs = _buffers(forward, inputs, groups, lambda p: state.get(p, {}).get("momentum_buffer"), sharding)
        return ke, bufs, 0
    flat = [p for g in groups for p in g]
    group_of = {id(p): gi for gi, g in enumerate(groups) for p in g}
    v_hats, steps = [], [0]
    for p in flat:
        st = state.get(p, {})
        if "exp_avg_sq" not in st:
            v_hats.append(None)
            continue
        gs = spec.groups[group_of[id(p)]]
        step = int(float(st["step"]))
        steps.append(step)
        v_hats.append(st["exp_avg_sq"].detach() / (1 - gs.betas[1] ** step))
    rms = [float(v.mean().sqrt()) for v in v_hats if v is not None]
    typical = float(np.median(rms)) if rms else 0.0
    scales = []
    for p, v_hat in zip(flat, v_hats, strict=True):
        if v_hat is None or float(v_hat.mean().sqrt()) < FROZEN_RMS * typical:
            scales.append(torch.zeros_like(p))  # no gradient reaches it in training (e.g. a bias before BN)
            continue
        v_hat = torch.maximum(v_hat, ADAM_V_FLOOR * v_hat.mean())  # as at fit start (estimate_kernel)
        scales.append((v_hat.sqrt() + spec.groups[group_of[id(p)]].eps).rsqrt().to(p.dtype))
    if batch_statistics:
        tangents = {id(p): state[p]["exp_avg"].detach() for p in flat if "exp_avg" in state.get(p, {})}
        out, grams, bufs, jw = batch_statistics_state(
            model, inputs, groups, kernel=kernel, scales=dict(zip(map(id, flat), scales, strict=True)),
            tangents=tangents, weight_decay=spec.has_weight_decay, output_fn=output_fn, sharding=sharding)
        return _estimate(out, reference, grams, jw), bufs, max(steps)
    # the kernel of w = w_k + s ⊙ z at z = 0: J diag(s²) Jᵀ, through the engine's fast paths
    kernel_spec = OptimizerSpec.from_optimizer(torch.optim.SGD([{"params": g} for g in groups], lr=1.0))
    ke = estimate_kernel(model, inputs, targets, kernel_spec, loss=loss, output_fn=output_fn, kernel=kernel,
                         projection_dim=projection_dim, seed=seed, batch_statistics=False,
                         parameter_scales=dict(zip(flat, scales, strict=True)), sharding=sharding)
    # B_g = J_{z,g} (s ⊙ m_g) = J_g (s² ⊙ m_g)
    preconditioned_m = {id(p): s**2 * state[p]["exp_avg"].detach()
                        for p, s in zip(flat, scales, strict=True) if "exp_avg" in state.get(p, {})}
    bufs = _buffers(forward, inputs, groups, lambda p: preconditioned_m.get(id(p)), sharding)
    if spec.has_weight_decay:
        ke.jvp_w0 = _buffers(forward, inputs, groups, lambda p: p.detach(), sharding)
    return ke, bufs, max(steps)


def _estimate(outputs, reference: KernelEstimate, grams, jvp_w) -> KernelEstimate:
    """A :class:`KernelEstimate` of given outputs (N, C) and Grams on the subset of ``reference``."""
    return KernelEstimate(outputs, reference.targets, grams, reference.kernel, reference.loss, jvp_w)
