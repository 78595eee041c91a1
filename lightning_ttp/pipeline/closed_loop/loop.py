"""Re-linearised closed loop: re-predict the rest of a run from its current state.

The open-loop prediction linearises the network once, at the fit-start weights w0. When
fine-tuning moves the features, the empirical NTK drifts and the real run leaves its
linearisation (faster or slower). At a few steps k of the run (geometric: 2, 5, 10, 20,
40 % of T; :func:`checkpoint_steps`) the closed loop

1. re-estimates the empirical NTK Θ^{(k)} at the current weights w_k on the *same* kernel
   subset (:func:`lightning_ttp.api.estimate_kernel`, eval mode), and the outputs f_k; a
   model with BatchNorm in train mode on the subset as one training batch instead
   (:func:`batch_statistics_state`: the batched train-mode Jacobian, as training sees it);
2. measures the drift against the fit-start kernel Θ^{(0)}: the scale
   s_k = Σ_g η_g tr Θ_g^{(k)} / Σ_g η_g tr Θ_g^{(0)} and the centred kernel-target alignment
   A(K) = ⟨K_c, (YYᵀ)_c⟩_F / (‖K_c‖_F ‖(YYᵀ)_c‖_F), K_c = HKH, H = I − 11ᵀ/N
   (Cortes et al. 2012), with K the per-sample kernel Σ_c Θ_{(i,c),(j,c)};
3. carries the optimiser state into function space: the image of the momentum buffer
   B_g = J_g^{(k)} b_g (SGD), or of Adam's preconditioned first moment
   B_g = J_g^{(k)} P_k m_g with P_k = diag(1/(√v̂_k + ε)) from the optimiser's own second
   moment (the kernel is then J P_k Jᵀ), each by one ``torch.func.jvp``;
4. simulates the remaining steps k..T in function space from f_k
   (:func:`lightning_ttp.dynamics.simulate_discrete`, buffers and Adam's step count carried;
   the expected gradient, or Monte Carlo mini-batch paths with ``num_paths`` ≥ 1), with the
   kernel's top eigenvalues clipped at the stability limit of the remaining lrs when the
   linearisation would diverge (the real network self-stabilises at the edge of stability)
   and, optionally, the lrs multiplied by the extrapolated kernel scale m(t) = ŝ(t)/ŝ(k),
   ŝ(t) = α + β log(1 + t) fitted to (0, 1), (k_j, s_{k_j})
   (scaling Θ by m is scaling η by m), m clipped to [1/``max_drift``, ``max_drift``];
5. joins the simulated curve S_τ (τ = t − k) to the observed prefix multiplicatively at the
   observed level ℓ_k (a straight line through the last observed losses, evaluated at k):
   L̂_t = ℓ_k S_{t−k}/S_0 for t ≥ k, the smoothed observed losses before k;
6. calibrates the speed: from the second call on, the previous call's curve is fitted to the
   losses observed since its step with :func:`lightning_ttp.pipeline.refine.refine_curve` (time warp
   a, log a ~ N(0, 1), evidence gate 1) and the new continuation is warped,
   L̂_{k+τ} ← L̂_{k+aτ}: how much faster (a > 1) or slower the real run went than its last
   linearisation;
7. blends the result R with the power law P fitted to the observed prefix after step k,
   L̂ = w R + (1 − w) P, w = e_P/(e_R + e_P) from the previous call's out-of-sample mean
   squared log errors on the losses observed since it (once ≥ 10 % of T lies between them).

For a model that is linear in its parameters steps 1–4 are exact: the continuation equals
real ``torch.optim.SGD`` training from step k, momentum included (tests check it step by
step), steps 5–6 change nothing and step 7 gives the exact curve a weight near 1. Adam's
second moment is held at its value at step k (an approximation).

This module is pure torch/numpy/scipy: no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...dynamics import BatchSampler, OptimizerSpec, simulate_discrete, stability_report
from ...dynamics.training_time import epsilon_training_time
from ...kernel.batch import batch_size as _num_samples
from ...kernel.shard import Sharding, map_rows
from ..batch_statistics import JACOBIAN_MAX_BYTES, batch_statistics_state, has_batch_statistics
from ..estimate import ADAM_V_FLOOR, KernelEstimate, estimate_kernel, standing_for
from ..outputs import OutputModule
from ..refine import default_smoothing_window, refine_curve, smooth_losses

__all__ = [
    "DEFAULT_FRACTIONS",
    "ClosedLoop",
    "KernelDrift",
    "LivePrediction",
    "centred_alignment",
    "checkpoint_steps",
    "continuation_batches",
    "kernel_drift",
    "relinearised_prediction",
]

DEFAULT_FRACTIONS = (0.02, 0.05, 0.10, 0.20, 0.40)
FROZEN_RMS = 1e-4  # Adam: a tensor whose rms √v̂ is below this × the median tensor's gets no gradient


# ---------------------------------------------------------------------------- drift measures
def _sample_kernel(gram: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample kernel K_ij = Σ_c Θ_(i,c),(j,c) (N, N) of a full (N·C)² or trace (N, N) Gram."""
    g = torch.as_tensor(gram, dtype=torch.float64)
    if g.shape[0] == n:
        return g
    c = g.shape[0] // n
    return torch.einsum("icjc->ij", g.reshape(n, c, n, c))


def _target_matrix(targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Y (N, C): one-hot for class indices, the targets themselves otherwise."""
    y = torch.as_tensor(targets)
    if y.dim() == 1 and not y.is_floating_point():
        return torch.nn.functional.one_hot(y.long(), num_outputs).to(torch.float64)
    return y.reshape(y.shape[0], -1).to(torch.float64)


def centred_alignment(kernel: torch.Tensor, targets: torch.Tensor) -> float:
    """Centred kernel-target alignment A(K, YYᵀ) ∈ [−1, 1] of an (N, N) kernel and targets Y (N, C).

    A = ⟨K_c, T_c⟩_F / (‖K_c‖_F ‖T_c‖_F), K_c = HKH, T_c = H YYᵀ H, H = I − 11ᵀ/N.
    """
    k = torch.as_tensor(kernel, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.float64).to(k.device).reshape(k.shape[0], -1)
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    yc = y - y.mean(0, keepdim=True)
    tc = yc @ yc.T
    denom = float(kc.norm() * tc.norm())
    return float((kc * tc).sum()) / denom if denom > 0 else 0.0


@dataclass
class KernelDrift:
    """How the kernel at step ``step`` differs from the fit-start kernel.

    Attributes:
        step: the optimiser step k of the current kernel.
        scale: Σ_g η_g tr Θ_g^{(k)} / Σ_g η_g tr Θ_g^{(0)} (lr-weighted trace ratio).
        alignment: centred kernel-target alignment of the current kernel.
        alignment_start: the same for the fit-start kernel.
    """

    step: int
    scale: float
    alignment: float
    alignment_start: float


def kernel_drift(start: Sequence[torch.Tensor], current: Sequence[torch.Tensor], targets: torch.Tensor,
                 lrs: Sequence[float] | np.ndarray, *, num_outputs: int, step: int = 0) -> KernelDrift:
    """Drift of per-group Grams ``current`` against ``start`` (same subset, same kernel kind).

    Args:
        start, current: one Gram per param group ((N·C)² or (N, N)).
        targets: the subset's targets (class indices or (N, C) values).
        lrs: one learning rate per group (the weights η_g of the trace ratio).
    """
    if len(start) != len(current) or len(start) != len(lrs):
        raise ValueError(f"got {len(start)} start Grams, {len(current)} current Grams and {len(lrs)} lrs: "
                         "pass one of each per param group")
    n = int(torch.as_tensor(targets).shape[0])
    ks = [sum(float(eta) * _sample_kernel(g, n) for eta, g in zip(lrs, grams, strict=True))
          for grams in (start, current)]
    t0, t1 = float(torch.trace(ks[0])), float(torch.trace(ks[1]))
    y = _target_matrix(targets, num_outputs)
    return KernelDrift(int(step), t1 / t0 if t0 > 0 else float("nan"), centred_alignment(ks[1], y),
                       centred_alignment(ks[0], y))


def _scale_trend(history: Sequence[KernelDrift]) -> tuple[float, float]:
    """(α, β) of ŝ(t) = α + β log(1 + t) fitted to (0, 1) and the measured scales."""
    t = np.array([0.0] + [d.step for d in history])
    s = np.array([1.0] + [d.scale for d in history])
    keep = np.isfinite(s)
    t, s = t[keep], s[keep]
    if np.unique(t).size < 2:
        return float(s[-1]), 0.0
    beta, alpha = np.polyfit(np.log1p(t), s, 1)
    return float(alpha), float(beta)


def drift_multiplier(history: Sequence[KernelDrift], step: int, total_steps: int, *,
                     max_drift: float = 3.0) -> np.ndarray:
    """m(t) = ŝ(t)/ŝ(k) for t = k..T−1: the extrapolated kernel scale relative to now."""
    alpha, beta = _scale_trend(history)
    t = np.arange(step, total_steps, dtype=np.float64)
    now = alpha + beta * np.log1p(step)
    if now <= 0:
        return np.ones_like(t)
    return np.clip((alpha + beta * np.log1p(t)) / now, 1.0 / max_drift, max_drift)


# ---------------------------------------------------------------------------- optimiser state
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


# ---------------------------------------------------------------------------- prediction
@dataclass
class LivePrediction:
    """The run's loss curve re-predicted at step k: observed prefix + re-linearised continuation.

    Attributes:
        step: k, the optimiser step at which the model was re-linearised.
        loss: predicted loss at steps 0..T (smoothed observed losses before k, the joined
            continuation from k on).
        continuation: the simulated loss on the kernel subset at steps k..T (before the join).
        level: ℓ_k, the observed loss level at k the continuation is joined to.
        drift: the kernel drift at k.
        multiplier: m(t), the extrapolated kernel scale applied to the lrs at steps k..T−1.
        seconds: wall time of this call; ``kernel_seconds`` the part spent in the kernel.
        info: smoothing width, Monte Carlo paths, Adam's step, the speed warp a and the
            stability measure ρ_max of the remaining steps before the cap.
    """

    step: int
    loss: np.ndarray
    continuation: np.ndarray
    level: float
    drift: KernelDrift
    multiplier: np.ndarray
    seconds: float
    kernel_seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Predicted loss at the last step T."""
        return float(self.loss[-1])

    def training_time(self, eps: float) -> int | None:
        """ε-training-time (steps) of the predicted curve (the package's definition)."""
        return epsilon_training_time(self.loss, eps)


def _level(observed: np.ndarray, step: int, window: int) -> float:
    """ℓ_k: a straight line through the last max(2·window, 3) observed losses, evaluated at k."""
    t = np.arange(observed.size, dtype=np.float64)
    keep = np.isfinite(observed)
    t, y = t[keep][-max(2 * window, 3):], observed[keep][-max(2 * window, 3):]
    if y.size == 0:
        raise ValueError("no finite observed loss to join the re-linearised prediction to")
    if y.size < 2:
        return float(y[-1])
    slope, intercept = np.polyfit(t, y, 1)
    level = float(intercept + slope * step)
    return level if level > 0 else float(y.min())


def relinearised_prediction(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: OptimizerSpec,
    inputs: Any,
    targets: torch.Tensor,
    observed: Sequence[float] | np.ndarray,
    total_steps: int,
    start: KernelEstimate,
    *,
    lr_schedule: np.ndarray | None = None,
    history: Sequence[LivePrediction] = (),
    loss: Any = "cross_entropy",
    batch_size: int | None = None,
    dataset_size: int | None = None,
    smoothing_window: int | None = None,
    output_fn: Callable | None = None,
    projection_dim: int | None = None,
    extrapolate_drift: bool = False,
    max_drift: float = 3.0,
    stability_cap: bool = True,
    calibrate: bool = True,
    calibration_prior: float = 1.0,
    num_paths: int = 0,
    batch_statistics: bool | None = None,
    stand_for_dataset: bool = True,
    blend: bool = True,
    blend_min_span: float = 0.1,
    seed: int = 0,
    sharding: Sharding | None = None,
) -> LivePrediction:
    """Re-predict the loss curve of a run at step k = ``len(observed)`` (see module docstring).

    Args:
        model, optimizer: the model at w_k and its optimiser (state read, never changed).
        spec: the optimiser as the fit-start prediction read it (``OptimizerSpec.from_optimizer``).
        inputs, targets: the fixed kernel subset (the same samples as ``start``).
        observed: the training losses of steps 0..k−1 as the user's training reports them
            (mini-batch means; NaN where missing).
        total_steps: T.
        start: the fit-start kernel estimate on the same subset (the open loop's), the
            reference of the drift measures.
        lr_schedule: (T, G) or (T,) lrs of the whole run; default: the spec's constant lrs.
        history: the live predictions of earlier calls on this run (the scale trend is
            fitted to their drifts; the last one calibrates the speed, ``calibrate``).
        batch_size, dataset_size: the optimiser-step batch and the training-set size; with
            batch_size < dataset_size and ``num_paths`` ≥ 1 the continuation is the mean of
            ``num_paths`` Monte Carlo mini-batch paths; with ``num_paths=0`` (default) or a full
            batch it follows the expected gradient (weights 1/N0: as accurate on
            ``benchmarks/fidelity.py``, one path of cost).
        batch_statistics: BatchNorm layers in train mode re-linearised on the batch statistics
            of the kernel subset (:func:`batch_statistics_state`; the training dynamics) rather
            than in eval mode; default (None): when the model has such layers, no
            ``projection_dim`` is set and the subset's Jacobian fits ``JACOBIAN_MAX_BYTES``.
        blend: combine the re-linearised curve R with the power law P fitted to the observed
            prefix (:func:`power_law_curve`), L̂ = w R + (1 − w) P after step k, with the weights
            w ∝ 1/e_R, 1 − w ∝ 1/e_P from the mean squared log errors e of the previous call's R
            and P on the smoothed losses observed since that call — only once that span covers
            ``blend_min_span`` · T steps (shorter spans favour the short-range power law); w = 1
            before.
        stand_for_dataset: with N0 < N the kernel at w_k is made to stand for the whole training set
            (:func:`lightning_ttp.pipeline.estimate.standing_for`: each subset sample's unshared kernel term
            weighted N0/N), as the fit-start prediction's is; ``start`` must then be the corrected
            fit-start estimate too (the drift compares like with like). Off for the look-ahead,
            whose real steps train on the subset itself.
        smoothing_window: for the observed prefix (default: the package's,
            :func:`lightning_ttp.pipeline.refine.default_smoothing_window`).
        projection_dim: random projection of the gradients (large models; cheaper kernels).
        extrapolate_drift: multiply the remaining lrs by the extrapolated kernel scale m(t)
            (default False: the kernel is held at Θ^{(k)}; on ``benchmarks/fidelity.py`` the
            extrapolation did not measurably help, see docs/prediction.md).
        stability_cap: clip the kernel's eigenvalues at the stability limit of the remaining
            lrs (the real network self-stabilises at the edge of stability; its linearisation
            would diverge).
        calibrate: time-warp the continuation by the speed of the real run relative to the
            previous call's curve (:func:`lightning_ttp.pipeline.refine.refine_curve` fitted to
            the losses observed since then); ``calibration_prior`` is the prior sd of log a.
        sharding: split the subset's samples across data-parallel processes for the kernel and
            the buffer images (:class:`lightning_ttp.kernel.Sharding`; a collective: every process
            calls with the same weights, optimiser state and ``observed``, and gets the same result).
    """
    started = time.perf_counter()
    obs = np.asarray(observed, dtype=np.float64).reshape(-1)
    step = obs.size
    if not 1 <= step < total_steps:
        raise ValueError(f"observed holds {step} losses; re-linearise at 1 <= step < total_steps={total_steps}")
    n0 = start.num_samples
    n = max(n0, int(dataset_size or n0))
    b = n if batch_size is None else int(batch_size)
    full_batch = b >= n
    window = smoothing_window or default_smoothing_window(-(-n // b), full_batch)
    lrs = spec.schedule(lr_schedule, total_steps, steps_name="total_steps")
    kernel_started = time.perf_counter()
    if batch_statistics is None:
        batch_statistics = projection_dim is None and has_batch_statistics(model) and _jacobian_fits(
            model, start, spec)
    ke, bufs, adam_step = _current_state(model, inputs, targets, spec, optimizer, loss=loss, output_fn=output_fn,
                                         kernel=start.kernel, projection_dim=projection_dim, seed=seed,
                                         reference=start if batch_statistics else None, sharding=sharding)
    if stand_for_dataset:
        ke = standing_for(ke, n)
    kernel_seconds = time.perf_counter() - kernel_started
    drift = kernel_drift(start.grams, ke.grams, start.targets, lrs[step], num_outputs=start.num_outputs, step=step)
    if extrapolate_drift:
        mult = drift_multiplier([*(p.drift for p in history), drift], step, total_steps, max_drift=max_drift)
    else:
        mult = np.ones(total_steps - step)
    remaining = lrs[step:total_steps] * mult[:, None]
    grams, rho = _stability_capped(ke, spec, remaining) if stability_cap else (ke.grams, float("nan"))
    batches, paths = continuation_batches(n0, b, n, num_paths, seed=seed, step=step, device=grams[0].device)
    res = simulate_discrete(ke.outputs, ke.targets, grams, ke.loss, spec, remaining, jvp_w0=ke.jvp_w0,
                            batches=batches, num_paths=paths, initial_buffers=bufs, start_step=adam_step,
                            fixed_preconditioner=spec.kind in ("adam", "adamw"))
    cont = res.loss.mean(axis=0)
    # full batch on the whole data set: the simulated loss at k is the run's loss, no join needed
    level = float(cont[0]) if full_batch and n0 >= n else _level(obs, step, window)
    joined = level * cont / cont[0] if cont[0] > 0 else cont + (level - cont[0])
    previous = history[-1].info.get("relinearised_loss", history[-1].loss) if history else None
    warp = _speed(previous, history[-1].step, obs, calibration_prior) if calibrate and history else 1.0
    if warp != 1.0:
        tau = np.arange(joined.size, dtype=np.float64)
        joined = np.interp(warp * tau, tau, joined)
    t_obs, finite = np.arange(step), np.isfinite(obs)
    prefix = smooth_losses(np.interp(t_obs, t_obs[finite], obs[finite]), window)  # missing losses interpolated
    relinearised = np.concatenate([prefix, joined])
    power = power_law_curve(obs, relinearised.size)
    weight = 1.0
    if blend and history and "relinearised_loss" in history[-1].info:
        weight = _blend_weight(history[-1], prefix, min_span=blend_min_span * total_steps)
    curve = relinearised.copy()
    curve[step:] = weight * relinearised[step:] + (1.0 - weight) * power[step:]
    return LivePrediction(step, curve, cont, level, drift, mult, time.perf_counter() - started, kernel_seconds,
                          {"smoothing_window": window, "num_paths": paths if batches is not None else 0,
                           "relinearised_loss": relinearised, "power_law_loss": power, "blend_weight": weight,
                           "adam_step": adam_step,
                           "batch_statistics": batch_statistics,
                           "warp": warp, "rho_max": rho})


def continuation_batches(n0: int, batch_size: int, dataset_size: int, num_paths: int, *, seed: int, step: int,
                         device: torch.device | str) -> tuple[Callable[[int], Any] | None, int]:
    """(batches, paths) of a continuation from step ``step``: Monte Carlo mini-batches of
    ``num_paths`` paths drawn from ``seed + step`` (the batch function of a
    :class:`~lightning_ttp.dynamics.BatchSampler`), or the expected gradient ``(None, 1)`` for a
    full batch or ``num_paths=0``. The look-ahead's linearised control draws the same batches."""
    if batch_size >= dataset_size or num_paths < 1:
        return None, 1
    sampler = BatchSampler(n0, batch_size, num_paths, n_total=dataset_size, seed=seed + step, device=device)
    return sampler.batch, num_paths


def _jacobian_fits(model: torch.nn.Module, start: KernelEstimate, spec: OptimizerSpec) -> bool:
    """Whether the subset's full Jacobian of the trainable parameters fits ``JACOBIAN_MAX_BYTES``."""
    count = sum(p.numel() for g in spec.params for p in g)
    return 8 * start.num_samples * start.num_outputs * count <= JACOBIAN_MAX_BYTES


def _stability_capped(ke: KernelEstimate, spec: OptimizerSpec, lrs: np.ndarray) -> tuple[list, float]:
    """Grams with their top eigenvalues clipped so that the remaining dynamics stay at ρ ≤ 1.

    ρ is the stability measure of :func:`lightning_ttp.dynamics.stability_report` at f_k (the
    kernel scaled by the loss curvature). With ρ_max > 1 every group's eigenvalues above
    λmax(Θ_g)/ρ_max are clipped to it, and again until ρ ≤ 1 (the curvature-weighted top
    direction need not be Θ's own): the top directions only, as a network at the edge of
    stability keeps its sharpness at the limit while the rest of its spectrum trains at full
    speed. Returns (grams, the uncapped ρ_max).
    """
    report = stability_report(ke.outputs, ke.targets, ke.grams, ke.loss, spec, lrs)
    first = rho = float(report["rho_max"])
    if rho <= 1.0:
        return ke.grams, rho
    eig = [torch.linalg.eigh(torch.as_tensor(g, dtype=torch.float64)) for g in ke.grams]
    caps = [float(vals[-1]) for vals, _ in eig]
    grams = ke.grams
    for _ in range(20):
        if rho <= 1.0 + 1e-9:
            break
        caps = [cap / rho for cap in caps]
        grams = [(vecs * vals.clamp(0.0, cap)) @ vecs.T for (vals, vecs), cap in zip(eig, caps, strict=True)]
        rho = float(stability_report(ke.outputs, ke.targets, grams, ke.loss, spec, lrs)["rho_max"])
    return grams, first


def _speed(previous: np.ndarray, since: int, observed: np.ndarray, prior: float) -> float:
    """Time warp a of the real run against a previous prediction ``previous`` (steps 0..T) over the
    losses observed since step ``since`` (MAP fit, log a ~ N(0, prior²), evidence gate 1; 1 without
    evidence of a difference)."""
    seen = observed[since:]
    if np.isfinite(seen).sum() < 3:
        return 1.0
    return refine_curve(np.asarray(previous)[since:], seen, warp_prior=prior, gate=1.0).warp


def _power(t, a, b, c):
    return a + b * (t + 1.0) ** (-c)


def power_law_curve(observed: np.ndarray, length: int) -> np.ndarray:
    """L(t) = a + b (t+1)^{−c} least-squares fitted to the finite observed losses (a, b ≥ 0,
    0 ≤ c ≤ 10; ``scipy.optimize.curve_fit``), at t = 0..length−1; the mean of the last
    observed losses where the fit fails."""
    import warnings

    from scipy.optimize import curve_fit

    t = np.arange(observed.size, dtype=np.float64)
    keep = np.isfinite(observed)
    t, y = t[keep], observed[keep]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = curve_fit(_power, t, y, p0=(0.5 * y.min(), y[0], 0.5),
                             bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 10.0]), maxfev=5000)
        return _power(np.arange(length, dtype=np.float64), *p)
    except (RuntimeError, ValueError):
        return np.full(length, float(y[-5:].mean()))


def _blend_weight(previous: LivePrediction, smoothed: np.ndarray, *, min_span: float) -> float:
    """w of the re-linearised curve: inverse mean squared log errors of the previous call's
    re-linearised and power-law curves on the smoothed losses observed since its step
    (1 when fewer than ``min_span`` steps were observed since)."""
    since, now = previous.step, smoothed.size
    if now - since < max(int(min_span), 3):  # floored: calls at rounded steps 10 % of T apart qualify
        return 1.0
    seen = np.log(np.maximum(smoothed[since:now], 1e-12))
    errors = [float(np.mean((np.log(np.maximum(np.asarray(previous.info[key])[since:now], 1e-12)) - seen) ** 2))
              for key in ("relinearised_loss", "power_law_loss")]
    if not all(np.isfinite(errors)):
        return 1.0
    inverse = [1.0 / max(e, 1e-12) for e in errors]
    return inverse[0] / (inverse[0] + inverse[1])


def checkpoint_steps(total_steps: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, *,
                     min_step: int = 3) -> list[int]:
    """The steps k = round(f·T) at which to re-linearise (distinct, ≥ ``min_step``, < T)."""
    steps = {max(int(round(f * total_steps)), min_step) for f in fractions}
    return sorted(k for k in steps if k < total_steps)


class ClosedLoop:
    """The closed loop of one run: fixed subset and settings, the drift history across calls.

    ``loop.steps`` are the steps at which to call :meth:`update` (default 2, 5, 10, 20, 40 %
    of T). Every keyword of :func:`relinearised_prediction` except ``history`` is accepted.
    """

    def __init__(self, spec: OptimizerSpec, inputs: Any, targets: torch.Tensor, total_steps: int,
                 start: KernelEstimate, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, **options: Any) -> None:
        if "history" in options:
            raise TypeError("ClosedLoop keeps its own drift history; do not pass history")
        self.spec, self.inputs, self.targets, self.total_steps, self.start = spec, inputs, targets, total_steps, start
        self.options = options
        self.steps = checkpoint_steps(total_steps, fractions)
        self.history: list[LivePrediction] = []

    def update(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               observed: Sequence[float] | np.ndarray) -> LivePrediction:
        """Re-predict at step k = ``len(observed)`` and remember the drift."""
        live = relinearised_prediction(model, optimizer, self.spec, self.inputs, self.targets, observed,
                                       self.total_steps, self.start, history=self.history,
                                       **self.options)
        self.history.append(live)
        return live
