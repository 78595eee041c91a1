"""The paper's gradient-flow ODE (deterministic part of eq. 1), integrated with LSODA.

    d f_t / dt = − Σ_g η̃_g(t) [Θ_g ∇_f L(f_t) + λ_g (J_g w0 + u_g)]

with t measured in optimiser steps, the effective learning rate η̃ = η (1 − d)/(1 − m) of
Appendix E (η/(1 − m) for the usual dampening d = 0; momentum is not simulated otherwise)
and ∇_f L the gradient of the mean loss over the N samples. Decoupled weight decay adds
−η λ (J_g w0 + u_g) without the momentum factor. A piecewise-constant lr schedule is
integrated segment by segment (one ``scipy.integrate.solve_ivp(method="LSODA")`` call per
run of equal lrs), so schedule jumps are honoured exactly. Appendix A of the paper uses the
same integrator (``odeint``'s default).

The ODE is the small-lr limit of the discrete dynamics: at large lr (η λmax ≳ 0.1) it
converges too fast or, past the stability limit, misses the divergence of the real run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .discrete import SimulationResult, _single_threaded, apply_kernel, kernel_kind
from .losses import Loss
from .optim_spec import OptimizerSpec

__all__ = ["simulate_ode", "FunctionSpaceDrift"]


class FunctionSpaceDrift:
    """The drift of eq. (1) on a state ``u`` of per-group displacements (G, P, N, C).

    Everything lives on the Grams' device (``self.device``) in ``dtype``; so must ``u``.
    """

    def __init__(self, f0, targets, grams, loss: Loss, spec: OptimizerSpec, *, jvp_w0=None,
                 use_elr: bool = True, dtype=torch.float64) -> None:
        self.grams = [torch.as_tensor(g).to(dtype) for g in grams]
        self.device = self.grams[0].device if self.grams else torch.device("cpu")
        f0 = torch.as_tensor(f0).to(self.device, dtype)
        if f0.dim() == 1:
            f0 = f0[:, None]
        self.f0 = f0
        self.n, self.c = f0.shape
        self.y = loss.prepare_targets(torch.as_tensor(targets), self.c).to(self.device)
        if len(self.grams) != spec.num_groups:
            raise ValueError(f"got {len(self.grams)} Grams for {spec.num_groups} parameter groups")
        self.kinds = [kernel_kind(g, self.n, self.c) for g in self.grams]
        self.loss, self.spec = loss, spec
        self.factors = [g.effective_lr_factor(spec.kind) if use_elr else 1.0 for g in spec.groups]
        self.jw = None
        if spec.has_weight_decay:
            self.jw = ([torch.zeros_like(f0) for _ in grams] if jvp_w0 is None
                       else [torch.as_tensor(j).to(self.device, dtype).reshape(self.n, self.c) for j in jvp_w0])
        self.ngroups = len(self.grams)
        # Without weight decay only f matters: keep one "group" of state.
        self.state_groups = self.ngroups if self.jw is not None else 1

    def outputs(self, u: torch.Tensor) -> torch.Tensor:
        """f = f0 + Σ_g u_g for u of shape (S, P, N, C)."""
        return self.f0 + u.sum(0)

    def grad(self, f: torch.Tensor) -> torch.Tensor:
        """∇_f L over all N samples (mean loss): G(f)/N."""
        return self.loss.per_sample_grad(f, self.y) / self.n

    def jacobian(self, u: torch.Tensor, lrs: np.ndarray) -> np.ndarray | None:
        """Dense ∂(du/dt)/∂u for LSODA's stiff mode (built-in losses, state ≤ 3000), else None.

        Built on the Grams' device, returned as a numpy array (LSODA runs on the CPU).

        ∂r/∂f = H/N with H the block-diagonal per-sample loss Hessians, so the block (s, s') is
        −Σ_{g→s} η̃_g Θ_g H/N, plus −η̃_s λ_s I (coupled) or −η_s λ_s I (decoupled) on the diagonal.
        """
        n, c, k = self.n, self.c, self.state_groups
        if k * n * c > 3000:
            return None
        f = self.outputs(u)[0]
        h = self.loss.sample_hessian(f, self.y)
        if h is None:
            return None
        h = h.to(self.device, torch.float64) / n
        nc = n * c
        eye = torch.eye(nc, dtype=torch.float64, device=self.device)
        jac = torch.zeros(k * nc, k * nc, dtype=torch.float64, device=self.device)
        for g, gs in enumerate(self.spec.groups):
            gram = self.grams[g].to(torch.float64)
            if self.kinds[g] == "trace" and c > 1:
                gram = torch.kron(gram, torch.eye(c, dtype=torch.float64, device=self.device))
            block = torch.einsum("iajb,jbd->iajd", gram.reshape(n, c, n, c), h).reshape(nc, nc)
            s = g if self.jw is not None else 0
            eta = lrs[g] * self.factors[g]
            for s2 in range(k):
                jac[s * nc : (s + 1) * nc, s2 * nc : (s2 + 1) * nc] -= eta * block
            if self.jw is not None and gs.weight_decay:
                rate = (lrs[g] if gs.decoupled_weight_decay else eta) * gs.weight_decay
                jac[s * nc : (s + 1) * nc, s * nc : (s + 1) * nc] -= rate * eye
        return jac.cpu().numpy()

    def __call__(self, u: torch.Tensor, lrs: np.ndarray) -> torch.Tensor:
        f = self.outputs(u)
        r = self.grad(f)
        du = torch.zeros_like(u)
        for g, gs in enumerate(self.spec.groups):
            eta = lrs[g] * self.factors[g]
            d = apply_kernel(self.grams[g], r, self.kinds[g])
            s = g if self.jw is not None else 0
            if self.jw is not None and gs.weight_decay:
                decay = gs.weight_decay * (self.jw[g] + u[g])
                if gs.decoupled_weight_decay:
                    du[s] -= lrs[g] * decay
                else:
                    d = d + decay
            du[s] -= eta * d
        return du


def _segments(lrs: np.ndarray):
    """Runs [a, b) of steps with identical lr rows."""
    start = 0
    for t in range(1, lrs.shape[0] + 1):
        if t == lrs.shape[0] or not np.array_equal(lrs[t], lrs[start]):
            yield start, t
            start = t


@_single_threaded
def simulate_ode(f0, targets, grams: Sequence[torch.Tensor], loss: Loss, spec: OptimizerSpec,
                 lr_schedule, *, jvp_w0=None, use_elr: bool = True, rtol: float = 1e-7,
                 atol: float = 1e-10, use_jacobian: bool = True) -> SimulationResult:
    """Integrate the ODE of eq. (1) and read L_t, error_t at t = 0..T (one path).

    With ``use_jacobian`` the analytic Jacobian (:meth:`FunctionSpaceDrift.jacobian`) is given
    to LSODA, which otherwise builds it by finite differences when it switches to its stiff
    method (large lr).
    """
    lrs = spec.schedule(lr_schedule)
    drift = FunctionSpaceDrift(f0, targets, grams, loss, spec, jvp_w0=jvp_w0, use_elr=use_elr)
    shape = (drift.state_groups, 1, drift.n, drift.c)

    def state(y: np.ndarray) -> torch.Tensor:  # LSODA's numpy state on the Grams' device
        return torch.from_numpy(y).reshape(shape).to(drift.device)

    u = np.zeros(int(np.prod(shape)))
    states = [u]
    for a, b in _segments(lrs):
        row = lrs[a]

        def rhs(_t, y, row=row):
            return drift(state(y), row).reshape(-1).cpu().numpy()

        def jac(_t, y, row=row):
            return drift.jacobian(state(y), row)

        has_jac = use_jacobian and drift.jacobian(state(u), row) is not None
        sol = solve_ivp(rhs, (a, b), u, method="LSODA", t_eval=np.arange(a + 1, b + 1),
                        rtol=rtol, atol=atol, **({"jac": jac} if has_jac else {}))
        if not sol.success or sol.y.shape[1] != b - a:
            break
        states.extend(sol.y.T)
        u = sol.y[:, -1].copy()
    steps = lrs.shape[0]
    us = torch.from_numpy(np.stack(states)).to(drift.device).reshape((len(states),) + shape)
    fs = drift.f0 + us[:, :, 0].sum(1)  # (T'+1, N, C)
    loss_curve = np.full(steps + 1, np.nan)
    loss_curve[: fs.shape[0]] = loss.value(fs, drift.y).cpu().numpy()
    err = loss.error(fs, drift.y)
    err_curve = None
    if err is not None:
        err_curve = np.full(steps + 1, np.nan)
        err_curve[: fs.shape[0]] = err.cpu().numpy()
        err_curve = err_curve[None]
    diverged = None if fs.shape[0] == steps + 1 else fs.shape[0]
    return SimulationResult(loss_curve[None], err_curve, fs[-1][None].cpu(), diverged)
