"""User-facing entry point: predict the loss curve and training time of a fine-tuning run.

``predict_training_time`` = ``OptimizerSpec.from_optimizer`` + ``lr_schedule_from_scheduler``
+ ``estimate_kernel`` (the expensive part: f0 and the per-group empirical NTK at w0) +
``simulate`` (seconds). The pieces are public so that a caller (the Lightning callback,
a hyper-parameter search) estimates the kernel once and simulates many "what-if"
settings (lr, batch size, momentum, steps) on it.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .dynamics import (
    BatchSampler,
    CallableLoss,
    Loss,
    OptimizerSpec,
    extrapolated_mse_curve,
    get_loss,
    simulate_discrete,
    simulate_minibatch,
    simulate_mse_closed_form,
    simulate_ode,
    simulate_sde,
    stability_report,
    summarize_paths,
)
from .dynamics.adam import simulate_adam
from .kernel.batch import batch_size as sample_count
from .kernel.batch import index_batch
from .prediction import Prediction

__all__ = [
    "KernelEstimate",
    "estimate_kernel",
    "lr_schedule_from_scheduler",
    "predict_training_time",
    "simulate",
]

METHODS = ("auto", "discrete", "mc", "ode", "sde", "closed_form")
FULL_KERNEL_MAX = 2500  # N·C above which "auto" uses the trace kernel
ADAM_V_FLOOR = 1e-2  # v_d >= ADAM_V_FLOOR * mean(v) per tensor in the Adam preconditioner


# ---------------------------------------------------------------------------- schedules
def lr_schedule_from_scheduler(scheduler: Any, steps: int, *, interval: str = "step",
                               steps_per_epoch: int | None = None, frequency: int = 1) -> np.ndarray:
    """Per-step learning rates (steps, num_groups) that ``scheduler`` will produce.

    The scheduler is deep-copied onto a throw-away optimiser (one dummy parameter per
    group, the groups' hyper-parameters copied) and stepped there; the user's optimiser
    and scheduler are never touched. ``interval="epoch"`` steps it every
    ``steps_per_epoch`` optimiser steps (Lightning's default interval), ``"step"`` every
    ``frequency`` steps. ``ReduceLROnPlateau`` depends on metrics not known in advance: the
    current lr is kept, with a warning.
    """
    steps = _check_steps(steps)
    opt = getattr(scheduler, "optimizer", None)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError("lr_scheduler must be a torch.optim.lr_scheduler object bound to an optimizer")
    current = np.array([[float(g["lr"]) for g in opt.param_groups]])
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        warnings.warn("ReduceLROnPlateau depends on future metrics: the current lr is kept constant",
                      stacklevel=2)
        return np.repeat(current, steps, axis=0)
    if interval not in ("step", "epoch"):
        raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
    if interval == "epoch" and not steps_per_epoch:
        raise ValueError("interval='epoch' needs steps_per_epoch")
    groups = []
    for g in opt.param_groups:
        extra = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
        groups.append({"params": [torch.zeros(1, requires_grad=True)], **extra})
    dummy = torch.optim.SGD(groups, lr=float(opt.param_groups[0]["lr"]))
    clone = copy.deepcopy(scheduler, {id(opt): dummy})
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            rows.append([float(g["lr"]) for g in dummy.param_groups])
            dummy.step()
            period = steps_per_epoch if interval == "epoch" else frequency
            if (t + 1) % int(period) == 0:
                clone.step()
    return np.asarray(rows, dtype=np.float64)


# ---------------------------------------------------------------------------- kernel
@dataclass
class KernelEstimate:
    """Everything the simulators need from the model, computed once at w0.

    Attributes:
        outputs: f0 on the kernel samples, (N0, C), float64.
        targets: their targets (as the loss expects them).
        grams: one Gram per optimiser param group, in the kernel's precision; "full" (N0·C)² sample-major or
            "trace" (N0, N0) normalised so that Θ ≈ K ⊗ I_C (the engine's Σ_c divided by C).
        kernel: "full" or "trace".
        jvp_w0: per group J_g · w_{0,g} (N0, C) when the optimiser has weight decay, else None.
        loss: the resolved loss.
        preconditioned: True if the Grams include the Adam preconditioner at w0 (Adam/AdamW).
        adam_blocks: Adam only: per-block raw Grams, group index, sizes and calibration κ
            (:func:`lightning_ttp.dynamics.adam.simulate_adam`).
        seconds: wall-clock of the estimate.
        info: sizes, projection, method details.
    """

    outputs: torch.Tensor
    targets: torch.Tensor
    grams: list[torch.Tensor]
    kernel: str
    loss: Loss
    jvp_w0: list[torch.Tensor] | None = None
    preconditioned: bool = False
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    adam_blocks: dict[str, Any] | None = None

    @property
    def num_samples(self) -> int:
        return int(self.outputs.shape[0])

    @property
    def num_outputs(self) -> int:
        return int(self.outputs.shape[1])


class _OutputWrapper(torch.nn.Module):
    """``output_fn(model, inputs)`` as a module, so ``functional_call`` can swap the weights."""

    def __init__(self, model: torch.nn.Module, output_fn: Callable | None) -> None:
        super().__init__()
        self.m = model
        self.fn = output_fn

    def forward(self, inputs):
        out = self.fn(self.m, inputs) if self.fn is not None else self.m(inputs)
        return out[:, None] if out.dim() == 1 else out.reshape(out.shape[0], -1)


class _Preconditioned(torch.nn.Module):
    """w = w0 + s ⊙ z with s = (√v + ε)^{-1/2}: its NTK in z at z = 0 is J diag(1/(√v+ε)) Jᵀ."""

    def __init__(self, model, params, second_moments, eps, output_fn) -> None:
        super().__init__()
        self.inner = _OutputWrapper(model, output_fn)
        names = {id(p): "m." + n for n, p in model.named_parameters()}
        self.names = [names[id(p)] for p in params]
        self.z = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros_like(p, requires_grad=True)) for p in params])
        self.w0 = [p.detach() for p in params]
        self.s = [(v.sqrt() + e).rsqrt().to(p.dtype) for v, e, p in zip(second_moments, eps, params, strict=True)]

    def forward(self, inputs):
        from torch.func import functional_call

        params = {n: w + s * z for n, w, s, z in zip(self.names, self.w0, self.s, self.z, strict=True)}
        return functional_call(self.inner, params, (inputs,), strict=False)


def _model_output_fn(output_fn):
    def fn(model, inputs):
        out = output_fn(model, inputs) if output_fn is not None else model(inputs)
        return out[:, None] if out.dim() == 1 else out.reshape(out.shape[0], -1)

    return fn


class _EvalMode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags.items():
            m.training = flag


def _jvp_w0(model, inputs, groups, output_fn) -> list[torch.Tensor]:
    """J_g · w_{0,g} per group with ``torch.func.jvp`` (central finite difference as fallback)."""
    from torch.func import functional_call, jvp

    wrapper = _OutputWrapper(model, output_fn)
    names = {id(p): "m." + n for n, p in model.named_parameters()}
    out = []
    with _EvalMode(model), torch.no_grad():
        for group in groups:
            sub = {names[id(p)]: p.detach() for p in group}

            def fn(params, sub=sub):
                return functional_call(wrapper, params, (inputs,), strict=False)

            try:
                out.append(jvp(fn, (sub,), (sub,))[1].detach().to(torch.float64).cpu())
            except Exception:  # noqa: BLE001 - forward-mode AD unsupported by some layer
                h = 1e-3
                plus = fn({k: v * (1 + h) for k, v in sub.items()})
                minus = fn({k: v * (1 - h) for k, v in sub.items()})
                out.append(((plus - minus) / (2 * h)).detach().to(torch.float64).cpu())
    return out


def _adam_second_moments(model, inputs, targets, loss: Loss, params, output_fn, batch_size: int,
                          seed: int) -> list[torch.Tensor]:
    """v_d ≈ E_B[g_{B,d}²] at w0, per parameter tensor, over up to 8 batches of ``batch_size``."""
    fwd = _model_output_fn(output_fn)
    n = sample_count(inputs)
    rng = np.random.default_rng(seed)
    nb = 1 if batch_size >= n else min(8, max(1, n // batch_size))
    sq = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with _EvalMode(model), torch.enable_grad():
        for _ in range(nb):
            idx = np.arange(n) if batch_size >= n else np.sort(rng.choice(n, batch_size, replace=False))
            idx_t = torch.as_tensor(idx)
            f = fwd(model, index_batch(inputs, idx_t))
            yb = targets[idx_t].to(f.device)
            if isinstance(loss, CallableLoss):
                val = loss._call(f, yb)
            else:
                val = loss.value(f.to(torch.float64), yb)
            grads = torch.autograd.grad(val, params, allow_unused=True)
            for acc, g in zip(sq, grads, strict=True):
                if g is not None:
                    acc += g.detach().to(torch.float64) ** 2 / nb
    return sq


def _blocks(groups: list[list[torch.nn.Parameter]], max_blocks: int = 1) -> list[tuple[int, list]]:
    """Split the param groups into ≤ max_blocks blocks of consecutive tensors (≥ 1 per group)."""
    total = sum(len(g) for g in groups)
    out = []
    for gi, g in enumerate(groups):
        if not g:
            continue
        share = max(1, round(max_blocks * len(g) / max(1, total)))
        per = int(np.ceil(len(g) / share))
        for s in range(0, len(g), per):
            out.append((gi, g[s : s + per]))
    return out


def _check_params_in_model(model: torch.nn.Module, params: Sequence[Sequence[torch.nn.Parameter]]) -> None:
    own = {id(p) for p in model.parameters()}
    missing = sum(1 for g in params for p in g if id(p) not in own)
    if missing:
        raise ValueError(
            f"{missing} optimizer parameter(s) are not parameters of the model: build the optimizer on "
            "this model's parameters (e.g. torch.optim.SGD(model.parameters(), ...))"
        )


def estimate_kernel(
    model: torch.nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    spec: OptimizerSpec | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss: str | Loss | Callable = "cross_entropy",
    output_fn: Callable | None = None,
    projection_dim: int | None = None,
    kernel: str = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
) -> KernelEstimate:
    """f0 and the per-group empirical NTK Θ_g = J_g J_gᵀ (eq. 2) at the current weights w0.

    Uses :func:`lightning_ttp.kernel.empirical_ntk` (model in eval mode, left unchanged)
    with the optimiser's param groups. With weight decay it also computes
    J_g·w_{0,g} (one ``torch.func.jvp`` per group), which makes the weight-decay term of the
    discrete dynamics exact. For Adam/AdamW the Grams are computed per block of parameter
    tensors (one block per param group by default: more blocks cost as many Gram products per
    simulated step and did not change the error, benchmarks/prediction_cost.py) and the second
    moments of mini-batch gradients of size ``batch_size`` at w0 calibrate the per-block
    adaptive scales (an approximation, see :mod:`lightning_ttp.dynamics.adam` and
    ``docs/prediction.md``); ``grams`` then hold the preconditioned kernel at w0, used by the
    ODE/SDE and the stability diagnostic.

    Args:
        inputs, targets: the N0 kernel samples (inputs: tensor or tuple/dict of tensors).
        spec / optimizer: the optimiser (one of them); its params must belong to ``model``.
        kernel: "full", "trace" or "auto" (full if N0·C ≤ 2500).
    """
    from .kernel import empirical_ntk

    started = time.perf_counter()
    if spec is None:
        if optimizer is None:
            raise ValueError("pass the optimizer (or an OptimizerSpec built from it)")
        spec = OptimizerSpec.from_optimizer(optimizer)
    if spec.params is None:
        raise ValueError("the OptimizerSpec carries no parameters: build it with OptimizerSpec.from_optimizer")
    _check_params_in_model(model, spec.params)
    n = sample_count(inputs)
    if n == 0:
        raise ValueError("no samples to estimate the kernel on: the data is empty")
    loss_obj = get_loss(loss)
    fwd = _model_output_fn(output_fn)
    with _EvalMode(model), torch.no_grad():
        c = int(fwd(model, index_batch(inputs, torch.arange(min(n, 2)))).shape[1])
    if kernel == "auto":
        kernel = "full" if n * c <= FULL_KERNEL_MAX else "trace"
    adam = spec.kind in ("adam", "adamw")
    groups = [list(g) for g in spec.params]
    blocks = _blocks(groups) if adam else None
    tensor_groups = [b[1] for b in blocks] if adam else groups
    nonempty = [i for i, g in enumerate(tensor_groups) if g]
    kernel_model, kernel_fn, kernel_groups = model, fwd, [tensor_groups[i] for i in nonempty]
    if adam:
        flat = [p for g in groups for p in g]
        y_pre = loss_obj.prepare_targets(torch.as_tensor(targets).detach().cpu(), c)
        moments = _adam_second_moments(model, inputs, y_pre, loss_obj, flat, output_fn, batch_size or n, seed)
        # Floor v_d at 1 % of its tensor's mean: coordinates with a vanishing gradient at w0 would
        # otherwise get a 1/ε preconditioner that real Adam never applies once they move.
        moments = [torch.maximum(v, ADAM_V_FLOOR * v.mean()) for v in moments]
        eps_of = {id(p): spec.groups[gi].eps for gi, g in enumerate(groups) for p in g}
        kernel_model = _Preconditioned(model, flat, moments, [eps_of[id(p)] for p in flat], output_fn)
        kernel_fn = None
        z_of = dict(zip(map(id, flat), kernel_model.z, strict=True))
        kernel_groups = [[z_of[id(p)] for p in tensor_groups[i]] for i in nonempty]
        mom = dict(zip(map(id, flat), moments, strict=True))
        adam_rms = [float(torch.cat([mom[id(p)].reshape(-1) for p in b[1]]).sqrt().mean()) for b in blocks]
    ntk = empirical_ntk(kernel_model, inputs, output_fn=kernel_fn, kernel=kernel, projection_dim=projection_dim,
                        parameter_groups=kernel_groups, seed=seed, memory_budget=memory_budget)
    f0 = ntk.outputs.detach().to(torch.float64)
    y = loss_obj.prepare_targets(torch.as_tensor(targets).detach().cpu(), c)
    if y.shape[0] != n:
        raise ValueError(f"got {y.shape[0]} targets for {n} inputs")
    size = n * c if kernel == "full" else n
    # the Grams keep the kernel's precision: the simulators multiply in it and accumulate in float64
    raw = [torch.zeros(size, size, dtype=ntk.gram.dtype) for _ in tensor_groups]
    for i, g in zip(nonempty, ntk.grams, strict=True):
        raw[i] = g.detach().cpu()
    if kernel == "trace":
        raw = [g / c for g in raw]
    info: dict[str, Any] = {"kernel_seconds": ntk.seconds, "num_parameters": [int(sum(p.numel() for p in g))
                                                                               for g in groups],
                            "projection_dim": projection_dim, "num_outputs": c, "num_samples": n}
    adam_blocks = None
    if adam:
        grams = [torch.zeros_like(raw[0]) for _ in groups]
        for k, (gi, _) in enumerate(blocks):
            grams[gi] += raw[k]
        adam_blocks = {"grams": raw, "group": [b[0] for b in blocks],
                       "sizes": [int(sum(p.numel() for p in b[1])) for b in blocks], "rms": adam_rms}
        info["adam_block_rms"] = adam_rms
    else:
        grams = raw
    jw = _jvp_w0(model, inputs, groups, output_fn) if spec.has_weight_decay else None
    return KernelEstimate(f0.cpu(), y, grams, kernel, loss_obj, jw, adam, time.perf_counter() - started, info,
                          adam_blocks)


# ---------------------------------------------------------------------------- simulation
def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive int (number of optimiser steps), got {steps!r}")
    return int(steps)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x)
    return x


def simulate(
    kernel_estimate: KernelEstimate,
    spec: OptimizerSpec,
    steps: int,
    batch_size: int | None = None,
    *,
    lr_schedule: np.ndarray | None = None,
    method: str = "auto",
    num_paths: int = 8,
    seed: int = 0,
    dataset_size: int | None = None,
    drop_last: bool = False,
    shuffle: bool = True,
    band: tuple[float, float] = (5.0, 95.0),
    sde_noise: str = "rescaled",
) -> Prediction:
    """Simulate ``steps`` optimiser steps on a kernel estimate (seconds; no model needed).

    Args:
        spec: the optimiser (possibly a what-if ``spec.replace(...)``).
        batch_size: optimiser-step batch size (× gradient accumulation × world size); ``None``
            or ≥ dataset size means full-batch gradient descent.
        lr_schedule: (steps, num_groups) or (steps,) lrs; default: the spec's constant lrs.
        method: "auto" (discrete for GD, Monte Carlo for mini-batches), "discrete" (the exact
            linearised optimiser on the expected gradient), "mc", "ode" (eq. 1 deterministic,
            LSODA, ELR), "sde" (eq. 1 by Euler–Maruyama), "closed_form" (MSE + GD, eq. 4–5; with
            ``dataset_size`` > N0 the spectrum is extrapolated to N, Appendix D).
        dataset_size: N, the training-set size (default: the kernel samples N0). When N0 < N,
            the full-batch gradient is the subset mean and mini-batches are mapped as in
            :mod:`lightning_ttp.dynamics.montecarlo`.
    """
    started = time.perf_counter()
    steps = _check_steps(steps)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    ke = kernel_estimate
    n0 = ke.num_samples
    n = n0 if dataset_size is None else int(dataset_size)
    if n < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    n = max(n, n0)
    b = n if batch_size is None else int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and b > n:
        raise ValueError(f"batch_size {b} > dataset size {n} with drop_last=True: no step would run")
    full_batch = b >= n
    if spec.kind in ("adam", "adamw") and not ke.preconditioned:
        raise ValueError("an Adam-type optimiser needs a kernel estimated with it (estimate_kernel(..., spec))")
    if len(ke.grams) != spec.num_groups:
        raise ValueError(f"the kernel has {len(ke.grams)} param groups, the optimiser {spec.num_groups}")
    if lr_schedule is None:
        lrs = spec.constant_schedule(steps)
    else:
        lrs = np.asarray(lr_schedule, dtype=np.float64)
        if lrs.ndim == 1:
            lrs = lrs[:, None] * (spec.lrs / spec.lrs[0] if spec.lrs[0] else np.ones(spec.num_groups))[None, :]
        if lrs.shape[0] < steps:
            raise ValueError(f"lr_schedule has {lrs.shape[0]} steps, fewer than steps={steps}")
        lrs = lrs[:steps]
    if method == "auto":
        method_used = "discrete" if full_batch else "mc"
    else:
        method_used = method
    msgs = list(spec.warnings)
    common = dict(jvp_w0=ke.jvp_w0)
    args = (ke.outputs, ke.targets, ke.grams, ke.loss, spec, lrs)
    adam_sim = spec.kind in ("adam", "adamw") and ke.adam_blocks is not None and method_used in ("discrete", "mc")
    if adam_sim:
        ab = ke.adam_blocks
        weights, paths = None, 1
        if method_used == "mc":
            sampler = BatchSampler(n0, b, num_paths, n_total=n, drop_last=drop_last, shuffle=shuffle, seed=seed)
            weights, paths = sampler.weights, num_paths
        res = simulate_adam(ke.outputs, ke.targets, ab["grams"], ab["group"], ab["sizes"], ab["rms"],
                            ke.loss, spec, lrs, jvp_w0=ke.jvp_w0, weights=weights, num_paths=paths)
    elif method_used == "discrete":
        if not full_batch:
            msgs.append("method='discrete' with mini-batches simulates the expected (full-batch) gradient; "
                        "use 'mc' for SGD noise")
        res = simulate_discrete(*args, **common)
    elif method_used == "mc":
        res = simulate_minibatch(*args, batch_size=b, n_total=n, drop_last=drop_last, shuffle=shuffle,
                                 num_paths=num_paths, seed=seed, **common)
    elif method_used == "ode":
        res = simulate_ode(*args, **common)
    elif method_used == "sde":
        res = simulate_sde(*args, batch_size=b, n_total=n, num_paths=num_paths, seed=seed, noise=sde_noise,
                           **common)
    else:
        if ke.loss.name != "mse":
            raise ValueError("method='closed_form' needs the MSE loss (eq. 4-5); use 'discrete' or 'ode'")
        if not full_batch:
            msgs.append("closed_form ignores mini-batch noise")
        res = simulate_mse_closed_form(ke.outputs, ke.targets, ke.grams, spec, lrs)
        if n > n0:
            # Appendix D: the kernel covers N0 < N samples; extrapolate its spectrum to N.
            factors = np.array([g.effective_lr_factor(spec.kind) for g in spec.groups])
            eff = lrs * factors[None, :]
            ref = eff[int(np.argmax(eff.sum(1)))]
            j = int(np.argmax(ref))
            theta = sum(g * (ref[i] / ref[j]) for i, g in enumerate(ke.grams))
            curve = extrapolated_mse_curve(ke.outputs, ke.targets, theta, eff[:, j], n)
            res = type(res)(curve[None], None, res.final_outputs, None)
            msgs.append(f"closed_form: spectrum extrapolated from {n0} to {n} samples (Appendix D, alpha=0.15)")
    sim_seconds = time.perf_counter() - started
    curves = res.loss
    if curves.shape[0] > 1:
        loss, loss_band = summarize_paths(curves, band)
    else:
        loss, loss_band = curves[0], None
    error = error_band = None
    if res.error is not None:
        if res.error.shape[0] > 1:
            error, error_band = summarize_paths(res.error, band)
        else:
            error = res.error[0]
    stab = stability_report(ke.outputs, ke.targets, ke.grams, ke.loss, spec, lrs,
                            cache=ke.info.setdefault("stability_cache", {}))
    if stab["message"]:
        msgs.append(stab["message"])
        warnings.warn(stab["message"], stacklevel=2)
    if not np.all(np.isfinite(loss)):
        msgs.append("the predicted loss diverges (non-finite values)")
    diagnostics = {
        "method": method_used,
        "optimizer": spec.name,
        "optimizer_kind": spec.kind,
        "kernel": ke.kernel,
        "kernel_samples": n0,
        "num_outputs": ke.num_outputs,
        "dataset_size": n,
        "batch_size": b,
        "full_batch": full_batch,
        "steps_per_epoch": (n // b if drop_last else math.ceil(n / b)) if not full_batch else 1,
        "num_paths": int(curves.shape[0]),
        "seed": seed,
        "lambda_max": stab["lambda_max"],
        "loss_curvature": stab["loss_curvature"],
        "max_stable_lr": stab["max_stable_lr"],
        "rho_max": stab["rho_max"],
        "unstable_steps": stab["unstable_steps"],
        "first_unstable_step": stab["first_unstable_step"],
        "kernel_seconds": ke.seconds,
        "simulation_seconds": sim_seconds,
        "seconds": ke.seconds + (time.perf_counter() - started),
        "loss": ke.loss.describe(),
        "lr_first": lrs[0].tolist(),
        "lr_last": lrs[-1].tolist(),
        "warnings": msgs,
        **{k: v for k, v in ke.info.items() if k in ("num_parameters", "projection_dim")},
    }
    return Prediction(np.arange(steps + 1), loss, loss_band, error, error_band, _jsonable(diagnostics))


# ---------------------------------------------------------------------------- data
def _cat(items: list) -> Any:
    first = items[0]
    if torch.is_tensor(first):
        return torch.cat(items)
    if isinstance(first, dict):
        return {k: _cat([it[k] for it in items]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([it[i] for it in items]) for i in range(len(first)))
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def _split_batch(batch, target_fn):
    if target_fn is not None:
        return batch, target_fn(batch)
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    raise ValueError("cannot split a batch into (inputs, targets): batches must be (x, y, ...) "
                     "or pass target_fn (and output_fn for custom inputs)")


def _collect(data, num_samples, target_fn, batch_size, seed):
    """(inputs, targets, dataset_size, batch_size, drop_last, shuffle) from a loader or (x, y)."""
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
        try:
            n_total = len(loader.dataset)
        except TypeError:
            n_total = None
        bs = batch_size or loader.batch_size
        drop_last = bool(loader.drop_last)
        shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        xs, ys, got = [], [], 0
        want = num_samples or 256
        # Iterating a shuffling loader draws from torch's global RNG: keep the user's RNG state.
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                x, y = _split_batch(batch, target_fn)
                k = sample_count(x)
                if bs is None:
                    bs = k
                take = min(k, want - got)
                xs.append(index_batch(x, torch.arange(take)))
                ys.append(torch.as_tensor(y)[:take])
                got += take
                if got >= want:
                    break
        if got == 0:
            raise ValueError("the DataLoader yielded no samples: the data is empty")
        if n_total is None:
            warnings.warn("the dataset has no len(): assuming it holds only the samples read for the kernel",
                          stacklevel=3)
            n_total = got
        return _cat(xs), torch.cat(ys), n_total, bs, drop_last, shuffle
    if isinstance(data, (list, tuple)) and len(data) == 2:
        x, y = data
        n = sample_count(x)
        if n == 0:
            raise ValueError("the data is empty (0 samples)")
        y = torch.as_tensor(y)
        if y.shape[0] != n:
            raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
        if num_samples and num_samples < n:
            idx = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(n, num_samples, replace=False)))
            x, y = index_batch(x, idx), y[idx]
        return x, y, n, batch_size or n, False, True
    raise TypeError("data must be a torch DataLoader or an (inputs, targets) pair")


def predict_training_time(
    model: torch.nn.Module,
    data: Any,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    loss: str | Loss | Callable = "cross_entropy",
    lr_scheduler: Any = None,
    num_samples: int | None = None,
    projection_dim: int | None = None,
    method: str = "auto",
    num_paths: int = 8,
    seed: int = 0,
    output_fn: Callable | None = None,
    target_fn: Callable | None = None,
    batch_size: int | None = None,
    scheduler_interval: str = "step",
) -> Prediction:
    """Predict the training-loss curve and ε-training-time of fine-tuning ``model``.

    The model is linearised at its current weights w0 (f_t ≈ f0 + J (w_t − w0)); the empirical
    NTK Θ = J Jᵀ (eq. 2) on up to ``num_samples`` training samples (default 256) drives the
    function-space dynamics of the optimiser for ``steps`` optimiser steps (see
    :func:`simulate`). Nothing is trained; the model and optimiser are left unchanged.

    Args:
        model: the (pre-trained) network.
        data: a ``DataLoader`` (batch size, drop_last, shuffling read from it) or an ``(x, y)``
            pair (full-batch GD unless ``batch_size`` is given).
        optimizer: ``torch.optim`` optimiser built on the model's parameters (param groups, lrs,
            momentum, dampening, Nesterov, weight decay read from it).
        steps: number of optimiser steps T.
        loss: "cross_entropy", "mse", "bce_with_logits", a ``torch.nn`` loss or any callable
            ``loss(outputs, targets)`` with mean reduction.
        lr_scheduler: a ``torch.optim.lr_scheduler`` on ``optimizer`` (stepped on a copy),
            every ``scheduler_interval`` ("step" or "epoch").
        projection_dim: random projection of the gradients (Section 4) for large models.
        method: see :func:`simulate`.
        output_fn: ``output_fn(model, inputs) -> (N, C)`` for models with custom outputs.
        target_fn: ``target_fn(batch) -> targets`` for batches that are not ``(x, y, ...)``.
    Returns:
        :class:`~lightning_ttp.prediction.Prediction`.
    """
    steps = _check_steps(steps)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    spec = OptimizerSpec.from_optimizer(optimizer)
    _check_params_in_model(model, spec.params)
    inputs, targets, n_total, bs, drop_last, shuffle = _collect(data, num_samples, target_fn, batch_size, seed)
    spe = n_total // bs if drop_last else math.ceil(n_total / bs)
    if lr_scheduler is not None:
        lrs = lr_schedule_from_scheduler(lr_scheduler, steps, interval=scheduler_interval,
                                         steps_per_epoch=max(1, spe))
    else:
        lrs = None
    ke = estimate_kernel(model, inputs, targets, spec, loss=loss, output_fn=output_fn,
                         projection_dim=projection_dim, seed=seed, batch_size=bs)
    return simulate(ke, spec, steps, bs, lr_schedule=lrs, method=method, num_paths=num_paths, seed=seed,
                    dataset_size=n_total, drop_last=drop_last, shuffle=shuffle)
