"""Discrete linearised dynamics in function space (the default simulator).

For the linearised model f(w) = f0 + J (w − w0) (J = ∂f/∂w at w0, N·C × D), every
optimiser whose update is a linear combination of past gradients and weights stays inside
function space: with J_g the Jacobian block of parameter group g and Θ_g = J_g J_gᵀ,

    J_g ∇_{w_g} L_B(f_t) = Θ_g ∇_f L_B(f_t)                      (eq. 2: Θ = ∇_w f ∇_w fᵀ)
    J_g w_{t,g}         = J_g w_{0,g} + u_{t,g},   u_{t,g} := J_g (w_{t,g} − w_{0,g})

so we track f_t = f0 + Σ_g u_{t,g}, the per-group displacements u_g and the images
B_g = J_g b_g of the momentum buffers, and apply PyTorch's SGD update *exactly*:

    d_g   = Θ_g ∇_f L_B(f_t) + λ_g (J_g w_0 + u_g)               (coupled weight decay)
    B_g   = d_g (first step),  m B_g + (1 − d) d_g  afterwards
    upd_g = d_g + m B_g (Nesterov) or B_g (heavy ball) or d_g (m = 0)
    u_g  ← u_g − η_{t,g} upd_g  [− η_{t,g} λ_g (J_g w_0 + u_g) for decoupled weight decay]

This is the discrete counterpart of the deterministic part of eq. (1) with Θ_η = Σ_g η_g Θ_g;
for a model that is linear in its parameters it reproduces ``torch.optim.SGD`` step for
step. The weight-decay term needs ``jvp_w0[g] = J_g · w_{0,g}`` (one ``torch.func.jvp`` with
tangent w0 restricted to group g, computed by the caller). Without it we set it to zero,
i.e. weight decay pulls towards w0 instead of towards 0 (a warning says so).

Adam(W) is not linear in the gradients: the fit-start prediction uses
:mod:`~lightning_ttp.dynamics.adam`. With a preconditioner held fixed (the closed loop
re-linearises with P_k = diag(1/(√v̂_k + ε)) from the optimiser's own second moment), Adam is
the bias-corrected EMA of the preconditioned direction, which this simulator runs when given
``fixed_preconditioner=True``:  B ← β1 B + (1 − β1) d,  upd = B / (1 − β1^{k+t+1}).

Starting mid-run (the closed loop, :mod:`lightning_ttp.pipeline.closed_loop`): ``f0`` are the outputs
at the current weights w_k, the Grams and ``jvp_w0`` are taken at w_k, ``initial_buffers``
are the images B_g = J_g b_g of the optimiser's buffers at step k (SGD: the momentum
buffer; Adam: the preconditioned first moment J_g P m) and ``start_step = k`` continues
Adam's bias correction.

The batch gradient is ∇_f L_B = w_t ⊙ G(f_t) with per-sample gradients G (see ``losses``)
and batch weights w_t (1/N for gradient descent; see ``montecarlo`` for mini-batches).
A leading "path" dimension P lets Monte Carlo simulate many batch sequences at once. A
mini-batch is kept as its sample indices (:class:`Batch`): Θ (w ⊙ G) = Σ_{i∈B} w_i Θ[:, i] G_i
reads only the batch's rows of the (symmetric) Gram, one ``embedding_bag`` per group and step
for all paths (|B|·C·N·C multiply-adds per path instead of (N·C)²).

Precision and device: the simulation runs on the Grams' device. The products Θ r run in the
Grams' precision (float32 Grams from a float32 model: half the memory traffic of float64;
float64 Grams: exact arithmetic as before); the state (f, u, momentum images) and the loss
are float64, so rounding does not accumulate over thousands of steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .batch import Batch
from .losses import Loss
from .optim_spec import OptimizerSpec

__all__ = ["SimulationResult", "simulate_discrete", "apply_kernel", "as_gram", "kernel_kind",
           "kronecker_factor", "single_thread"]


#: the continuation past the run stops once the mean loss's change over the last window,
#: times the windows still to simulate, is below this share of its total drop, or within its
#: Monte Carlo noise (at two checks in a row): while the window changes do not grow, the held
#: tail is within this share of the drop, or within the noise, of the simulated one
SETTLE_TOLERANCE = 0.01
#: the settle checks' window: T/10 steps, at least this many (momentum oscillates over ~1/(1−m))
SETTLE_MIN_WINDOW = 10


@contextlib.contextmanager
def single_thread():
    """Run torch on one intra-op thread (restored afterwards).

    The simulators do thousands of tiny tensor ops; with several intra-op threads on a busy
    machine each op can cost milliseconds of thread synchronisation instead of microseconds.
    (The one larger product per step gains ~1.8× from a second thread on an idle 2-core
    machine but loses up to 10× when the cores are shared: one thread is the predictable choice.)
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class SimulationResult:
    """Curves of every simulated path: ``loss`` (P, T+1) and ``error`` (P, T+1) or None."""

    loss: np.ndarray
    error: np.ndarray | None
    final_outputs: torch.Tensor
    diverged_at: int | None = None
    #: the step after which the curves were held at their settled values (``settle_after``)
    settled_at: int | None = None


def kernel_kind(gram: torch.Tensor, n: int, c: int) -> str:
    """``"full"`` for an (N·C, N·C) Gram (sample-major), ``"trace"`` for (N, N) (Θ ⊗ I_C)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    if gram.shape[0] == n * c:
        return "full"
    if gram.shape[0] == n:
        return "trace"
    raise ValueError(f"Gram of size {gram.shape[0]} matches neither N·C = {n * c} nor N = {n}")


def kronecker_factor(gram: torch.Tensor, n: int, c: int, rtol: float = 1e-5) -> torch.Tensor | None:
    """K (N, N) when a full sample-major Gram is K ⊗ I_C to ``rtol`` of its largest entry, else None.

    That is the case exactly when only a final linear layer trains (a linear probe:
    Θ_{(i,c),(j,c')} = δ_cc' (φ_i·φ_j + 1)); the trace kernel K then simulates the same
    dynamics with C times fewer multiply-adds per step (``kernel_kind`` ``"trace"``).
    """
    if c < 2 or kernel_kind(gram, n, c) != "full":
        return None
    blocks = gram.reshape(n, c, n, c)
    diag = torch.diagonal(blocks, dim1=1, dim2=3)  # (N, N, C): the class-diagonal blocks
    scale = float(diag.abs().max())
    if scale == 0 or float((diag - diag[..., :1]).abs().max()) > rtol * scale:
        return None
    off_diagonal = ~torch.eye(c, dtype=torch.bool, device=gram.device)
    if float(blocks.abs().mul(off_diagonal[None, :, None, :]).max()) > rtol * scale:
        return None
    return diag[..., 0].contiguous()


def as_gram(gram) -> torch.Tensor:
    """A Gram as the simulators use it: float64 stays float64, any other dtype becomes float32."""
    gram = torch.as_tensor(gram)
    return gram if gram.dtype == torch.float64 else gram.to(torch.float32)


def apply_kernel(gram: torch.Tensor, r: torch.Tensor, kind: str, batch: Batch | None = None) -> torch.Tensor:
    """Θ r as (P, N, C), computed in the Gram's precision and returned in r's.

    ``r``: (P, N, C), or with a sparse ``batch`` the batch gradient's rows
    (:meth:`Batch.gradient`). Full Gram: (r·Θ) on the flattened sample-major vector (Θ is
    symmetric); trace: Σ_m Θ_nm r_mc.
    """
    out = product(gram, r, kind, batch)
    p, c = r.shape[0], r.shape[-1]
    if kind == "full":
        return out.reshape(p, -1, c).to(r.dtype)
    return out.transpose(1, 2).to(r.dtype)


def product(gram: torch.Tensor, r: torch.Tensor, kind: str, batch: Batch | None = None) -> torch.Tensor:
    """rᵀ Θ in the Gram's precision: (P, W) for full Grams, (P, C, W) for trace ones (W = the
    Gram's columns: several Grams may stand side by side, see ``adam.stack_blocks``).

    With a sparse ``batch`` (r holds the batch's K rows) only the batch's rows of Θ are read:
    one ``embedding_bag`` (a weighted sum of gathered rows, never materialised).
    """
    x = r.to(gram.dtype)
    p, c = x.shape[0], x.shape[-1]
    if batch is None or batch.index is None:
        return x.reshape(p, -1) @ gram if kind == "full" else x.transpose(1, 2) @ gram
    if kind == "full":  # rows i·C + c of the sample-major Gram, weighted by r_ic
        rows, weights = batch.gram_rows(c), x.reshape(p, -1)
    else:  # one bag of rows per (path, class)
        rows, weights = batch.trace_rows(c), x.transpose(1, 2).reshape(p * c, -1)
    out = F.embedding_bag(rows, gram, per_sample_weights=weights, mode="sum")
    return out if kind == "full" else out.reshape(p, c, -1)


class CurveRecorder:
    """Loss (and error) of every path at every step, kept on the simulation's device.

    One host transfer at the end instead of a synchronisation per step. With ``settle_after``
    (the run's last step T when the simulation continues past it), :meth:`settled` tells the
    simulator to stop once the mean loss has settled (:data:`SETTLE_TOLERANCE`); the steps not
    simulated hold the last values.
    """

    def __init__(self, loss: Loss, y: torch.Tensor, paths: int, steps: int, device: torch.device,
                 settle_after: int | None = None) -> None:
        self.loss, self.y = loss, y
        self.values = torch.empty(steps + 1, paths, dtype=torch.float64, device=device)
        self.errors: torch.Tensor | None = None
        self.settle_after = settle_after
        self.window = max(SETTLE_MIN_WINDOW, (settle_after or 0) // 10)
        self.last = -1
        self._calm_checks = 0

    def record(self, t: int, f: torch.Tensor, value: torch.Tensor | None = None) -> None:
        self.values[t] = self.loss.value(f, self.y) if value is None else value
        e = self.loss.error(f, self.y)
        if e is not None:
            if self.errors is None:
                self.errors = torch.empty_like(self.values)
            self.errors[t] = e
        self.last = t

    def settled(self, t: int) -> bool:
        """Past ``settle_after``, every window: has the mean loss (over paths) stopped moving, at
        this check and the one before? Its change between the last two windows (their means)
        must be below :data:`SETTLE_TOLERANCE` of its total drop per window still to simulate,
        or within twice its own Monte Carlo noise (the within-window spread over √window: a
        smooth curve's trend is never taken for noise)."""
        if self.settle_after is None or t < self.settle_after or (t - self.settle_after) % self.window:
            return False
        w = self.window
        if t + 1 < 2 * w:
            return False
        mean = self.values[t + 1 - 2 * w: t + 1].mean(1)
        recent, before = float(mean[w:].mean()), float(mean[:w].mean())
        total = float(self.values[0].mean()) - recent
        remaining = math.ceil((self.values.shape[0] - 1 - t) / w)
        change = abs(before - recent)
        noise = float(mean[w:].std() + mean[:w].std()) / (2 * math.sqrt(w)) if self.values.shape[1] > 1 else 0.0
        calm = (math.isfinite(recent) and total > 0
                and (change * remaining <= SETTLE_TOLERANCE * total or change <= 2 * noise))
        self._calm_checks = self._calm_checks + 1 if calm else 0
        return self._calm_checks >= 2

    def result(self, f: torch.Tensor) -> SimulationResult:
        """The curves as (P, T+1) numpy arrays and the first step whose loss is not finite."""
        settled_at = None
        if self.last < self.values.shape[0] - 1:
            settled_at = self.last
            self.values[self.last + 1:] = self.values[self.last]
            if self.errors is not None:
                self.errors[self.last + 1:] = self.errors[self.last]
        losses = self.values.T.cpu().numpy()
        errs = None if self.errors is None else self.errors.T.cpu().numpy()
        bad = np.nonzero(~np.isfinite(losses[:, :-1]).all(0))[0]
        return SimulationResult(losses, errs, f, int(bad[0]) if bad.size else None, settled_at)


@_single_threaded
def simulate_discrete(
    f0: torch.Tensor,
    targets: torch.Tensor,
    grams: Sequence[torch.Tensor],
    loss: Loss,
    spec: OptimizerSpec,
    lr_schedule: np.ndarray,
    *,
    jvp_w0: Sequence[torch.Tensor] | None = None,
    batches: Callable[[int], Batch] | None = None,
    num_paths: int = 1,
    dtype: torch.dtype = torch.float64,
    initial_buffers: Sequence[torch.Tensor | None] | None = None,
    start_step: int = 0,
    fixed_preconditioner: bool = False,
    settle_after: int | None = None,
) -> SimulationResult:
    """Iterate the linearised model in function space for ``len(lr_schedule)`` steps.

    Args:
        f0: outputs at w0 on the N kernel samples, (N, C).
        targets: targets of those samples (class indices, probabilities or values).
        grams: one Gram per parameter group (same order as ``spec.groups``), each (N·C, N·C)
            sample-major or (N, N) trace kernel.
        loss: a :class:`~lightning_ttp.dynamics.losses.Loss`.
        spec: the optimiser.
        lr_schedule: (T, G) learning rate of every group at every step (or (T,) for one group
            / proportional groups).
        jvp_w0: per group J_g · w_{0,g} as (N, C); needed only with weight decay.
        batches: ``batches(t) -> Batch``, the batches of the P paths at step t (e.g.
            :meth:`~lightning_ttp.dynamics.montecarlo.BatchSampler.batch`); default the full
            batch (weights 1/N).
        num_paths: P, the number of paths simulated together.
        initial_buffers: per group the image J_g b_g (N, C) of the optimiser's buffer when
            continuing a run (None: empty buffer, as at the first step).
        start_step: optimiser steps already taken (Adam's bias correction continues from it).
        fixed_preconditioner: Adam-type ``spec`` only: the Grams already hold a fixed
            preconditioner (J P Jᵀ); simulate Adam's first moment on them.
        settle_after: the run's last step T when simulating a continuation past it: the
            simulation stops once the mean loss has settled (:class:`CurveRecorder`) and the
            remaining steps hold the last values.
    Returns:
        :class:`SimulationResult` with the loss L_0..L_T on all N samples.
    """
    lrs = spec.schedule(lr_schedule)
    steps, ngroups = lrs.shape
    adam = spec.kind in ("adam", "adamw")
    if adam and not fixed_preconditioner:
        raise ValueError("Adam-type optimisers are not linear in the gradients: use dynamics.simulate_adam "
                         "(or pass fixed_preconditioner=True with preconditioned Grams)")
    if len(grams) != ngroups:
        raise ValueError(f"got {len(grams)} Grams for {ngroups} parameter groups")
    grams = [as_gram(g) for g in grams]
    device = grams[0].device
    f0 = torch.as_tensor(f0).to(device, dtype)
    if f0.dim() == 1:
        f0 = f0[:, None]
    n, c = f0.shape
    y = loss.prepare_targets(torch.as_tensor(targets), c).to(device)
    kinds = [kernel_kind(g, n, c) for g in grams]
    need_u = spec.has_weight_decay
    if need_u:
        if jvp_w0 is None:
            warnings.warn(
                "weight decay without jvp_w0 (J·w0): simulated as decay towards w0 instead of 0",
                stacklevel=2,
            )
            jw = [torch.zeros(n, c, dtype=dtype, device=device) for _ in grams]
        else:
            jw = [torch.as_tensor(j).to(device, dtype).reshape(n, c) for j in jvp_w0]
        u = [torch.zeros(num_paths, n, c, dtype=dtype, device=device) for _ in grams]
    f = f0.expand(num_paths, n, c).clone()
    bufs: list[torch.Tensor | None] = [None] * ngroups
    if initial_buffers is not None:
        if len(initial_buffers) != ngroups:
            raise ValueError(f"got {len(initial_buffers)} initial buffers for {ngroups} parameter groups")
        bufs = [None if b is None else torch.as_tensor(b).to(device, dtype).reshape(n, c).expand(num_paths, n, c)
                .clone() for b in initial_buffers]
    full_batch = Batch(torch.full((num_paths, n), 1.0 / n, dtype=dtype, device=device))
    curves = CurveRecorder(loss, y, num_paths, steps, device, settle_after)
    for t in range(steps):
        batch = full_batch if batches is None else batches(t).to(device)
        value, r = loss.value_and_batch_gradient(f, y, batch)
        curves.record(t, f, value)
        if curves.settled(t):
            break
        for gi, gs in enumerate(spec.groups):
            lr = lrs[t, gi]
            d = apply_kernel(grams[gi], r, kinds[gi], batch)
            if need_u and gs.weight_decay and not gs.decoupled_weight_decay:
                d = d + gs.weight_decay * (jw[gi] + u[gi])
            if adam:
                b1 = gs.betas[0]
                bufs[gi] = (1 - b1) * d if bufs[gi] is None else b1 * bufs[gi] + (1 - b1) * d
                upd = bufs[gi] / (1 - b1 ** (start_step + t + 1))
            elif gs.momentum:
                if bufs[gi] is None:
                    bufs[gi] = d.clone()
                elif gs.dampening:
                    bufs[gi] = torch.add(gs.momentum * bufs[gi], d, alpha=1 - gs.dampening)
                else:
                    bufs[gi] = torch.add(d, bufs[gi], alpha=gs.momentum)
                upd = torch.add(d, bufs[gi], alpha=gs.momentum) if gs.nesterov else bufs[gi]
            else:
                upd = d
            if not need_u:  # r was taken at the step's start: the groups' updates add up in any order
                f = f.add(upd, alpha=-float(lr))
                continue
            step = -lr * upd
            if gs.weight_decay and gs.decoupled_weight_decay:
                step = step - lr * gs.weight_decay * (jw[gi] + u[gi])
            u[gi] = u[gi] + step
            f = f + step
    else:
        curves.record(steps, f)
    return curves.result(f)
