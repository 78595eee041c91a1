"""The kernel of a model that trains on batch statistics (pure torch, no Lightning).

A BatchNorm layer in train mode normalises by the statistics of its batch, so each output
depends on every sample of it: :func:`batch_statistics_state` takes the Jacobian of the kernel
subset as *one training batch*. Used at fit start (:func:`lightning_ttp.pipeline.estimate.estimate_kernel`)
and at every re-linearisation of the closed loop (:mod:`lightning_ttp.pipeline.closed_loop`): its own
module, below both.
"""

from __future__ import annotations

import torch

from ..kernel.shard import Sharding
from .outputs import OutputModule

__all__ = ["JACOBIAN_MAX_BYTES", "batch_statistics_state", "has_batch_statistics", "kernel_on_batch_statistics"]

JACOBIAN_MAX_BYTES = 256 * 2**20  # the batch-statistics kernel holds the full Jacobian (N0·C × P float64)
#: rows of the Jacobian per batched backward (``is_grads_batched``): 2.2× faster than one backward
#: per row on ``benchmarks/defaults.py``'s BatchNorm CNN (256 samples × 5 outputs; a one-off timing,
#: not a benchmark row), the same values
ROW_CHUNK = 32


def _jacobian_rows(outputs: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """∂outputs/∂p for each parameter, (rows, p.numel()): backwards of ``ROW_CHUNK`` one-hot seeds at
    a time (vmapped by autograd), one row at a time where a layer has no batching rule."""
    flat = outputs.reshape(-1)
    m = flat.numel()
    parts: list[list[torch.Tensor]] = [[] for _ in params]

    def add(grads, rows: int) -> None:
        for part, p, g in zip(parts, params, grads, strict=True):
            part.append(torch.zeros(rows, p.numel(), device=flat.device) if g is None else g.reshape(rows, -1))

    try:
        for start in range(0, m, ROW_CHUNK):
            rows = min(m, start + ROW_CHUNK) - start
            seeds = torch.zeros(rows, m, dtype=flat.dtype, device=flat.device)
            seeds[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
            add(torch.autograd.grad(flat, params, grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True), rows)
    except RuntimeError:  # a layer without a batching rule
        parts = [[] for _ in params]
        for o in flat:
            add([None if g is None else g[None] for g in torch.autograd.grad(o, params, retain_graph=True,
                                                                             allow_unused=True)], 1)
    return [torch.cat(part).to(torch.float64) for part in parts]


def has_batch_statistics(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains on batch statistics: a BatchNorm layer in train mode."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
               and (m.track_running_stats is False or m.momentum != 0) for m in model.modules())


def kernel_on_batch_statistics(model: torch.nn.Module, num_samples: int, num_outputs: int, num_parameters: int) -> bool:
    """Whether the subset's kernel is taken on its batch statistics (:func:`batch_statistics_state`):
    the model trains on batch statistics and the Jacobian (N·C × P float64) fits ``JACOBIAN_MAX_BYTES``."""
    return has_batch_statistics(model) and 8 * num_samples * num_outputs * num_parameters <= JACOBIAN_MAX_BYTES


def batch_statistics_state(model, inputs, groups: list[list[torch.nn.Parameter]], *, kernel: str,
                            scales: dict[int, torch.Tensor] | None, tangents: dict[int, torch.Tensor],
                            weight_decay: bool, output_fn,
                            sharding: Sharding | None = None) -> tuple[torch.Tensor, list, list, list | None]:
    """Outputs, Grams, buffer images and J_g w_g of the subset as *one training batch*.

    BatchNorm in train mode normalises by the statistics of the batch, so each output depends
    on every sample of it: the Jacobian J = ∂f/∂w of the batched forward (rows (i, c)) is taken
    with the subset as the batch (one backward pass per output, running statistics untouched), and
    Θ_g = J_g S_g J_gᵀ, B_g = J_g S_g v_g, with S_g = diag(s²) for Adam's preconditioner (``scales``)
    and the identity for SGD. This is the kernel of the dynamics the training steps follow;
    the eval-mode (running statistics) kernel of :func:`estimate_kernel` trains faster than them.
    With a ``sharding`` every process runs the (whole-batch) forward and the backward passes of
    its shard's rows of J only; the rows are all-gathered.
    """
    forward = OutputModule(model, output_fn)
    flat = [p for g in groups for p in g]
    modes = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    tracking = [m.track_running_stats for m in bns]
    model.eval()  # dropout and the like off; BatchNorm on the subset's batch statistics, running ones untouched
    for m in bns:
        m.train()
        m.track_running_stats = False
    try:
        with torch.enable_grad():
            out = forward(inputs)
            lo, hi = (0, out.shape[0]) if sharding is None else sharding.bounds(out.shape[0])
            rows = _jacobian_rows(out[lo:hi], flat)
    finally:
        for m, flag in zip(bns, tracking, strict=True):
            m.track_running_stats = flag
        for m, flag in modes.items():
            m.training = flag
    out = out.detach()
    n, c = out.shape
    device = out.device
    jf = {id(p): j for p, j in zip(flat, rows, strict=True)}
    if hi - lo < n:  # this process's rows (i, c) of its shard's samples: gather all of them
        jf = {key: sharding.gather_rows(j.reshape(hi - lo, c, -1), n).reshape(n * c, -1) for key, j in jf.items()}
    scale2 = {id(p): (torch.ones(p.numel(), dtype=torch.float64, device=device) if scales is None
                      else scales[id(p)].reshape(-1).to(torch.float64) ** 2) for p in flat}
    grams, bufs, jw = [], [], []
    for group in groups:
        g = sum(((jf[id(p)] * scale2[id(p)]) @ jf[id(p)].T for p in group),
                torch.zeros(n * c, n * c, dtype=torch.float64, device=device))
        grams.append(g if kernel == "full" else torch.einsum("icjc->ij", g.reshape(n, c, n, c)) / c)
        have = [p for p in group if id(p) in tangents]
        bufs.append(sum(jf[id(p)] @ (scale2[id(p)] * tangents[id(p)].reshape(-1).to(torch.float64))
                        for p in have).reshape(n, c) if have else None)
        jw.append(sum(jf[id(p)] @ p.detach().reshape(-1).to(torch.float64) for p in group).reshape(n, c)
                  if group else torch.zeros(n, c, dtype=torch.float64, device=device))
    # outputs, buffer images and J·w on the CPU like estimate_kernel's; the Grams stay on the device
    bufs = [None if b is None else b.cpu() for b in bufs]
    return out.to(torch.float64).cpu(), grams, bufs, ([j.cpu() for j in jw] if weight_decay else None)
