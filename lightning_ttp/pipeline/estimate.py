"""Kernel estimation: everything the simulators need from the model, computed once at w0.

:func:`estimate_kernel` = f0 and the per-param-group empirical NTK Θ_g = J_g J_gᵀ (eq. 2) on
the kernel subset, plus J_g·w0_g under weight decay and the Adam preconditioner's scales.
Pure torch: no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..dynamics import CallableLoss, Loss, OptimizerSpec, get_loss
from ..dynamics.losses import TokenCrossEntropy, token_loss
from ..kernel.batch import batch_size as sample_count
from ..kernel.batch import index_batch
from ..kernel.modes import preserve_modes
from ..kernel.shard import Sharding, map_rows
from ..kernel.subset import stand_for_dataset
from .batch_statistics import batch_statistics_state, kernel_on_batch_statistics
from .data import logits_of, num_samples_in
from .outputs import OutputModule, flat_output_fn, model_outputs

__all__ = [
    "FULL_KERNEL_MAX",
    "KernelEstimate",
    "PerSampleOutputs",
    "estimate_kernel",
    "per_sample_view",
    "standing_for",
]

#: N·C above which ``kernel="auto"`` uses the trace kernel.
FULL_KERNEL_MAX = 2500
ADAM_V_FLOOR = 1e-2  # v_d >= ADAM_V_FLOOR * mean(v) per tensor in the Adam preconditioner


@dataclass
class KernelEstimate:
    """Everything the simulators need from the model, computed once at w0.

    Attributes:
        outputs: f0 on the kernel samples, (N0, C), float64.
        targets: their targets (as the loss expects them).
        grams: one Gram per optimiser param group, in the kernel's precision and on the model's device (the
            simulators run there); "full" (N0·C)² sample-major or "trace" (N0, N0) normalised so that
            Θ ≈ K ⊗ I_C (the engine's Σ_c divided by C). ``outputs``, ``targets`` and ``jvp_w0`` (N0 × C
            each) are on the CPU.
        kernel: "full" or "trace".
        jvp_w0: per group J_g · w_{0,g} (N0, C) when the optimiser has weight decay, else None.
        loss: the resolved loss.
        preconditioned: True if the Grams include the Adam preconditioner at w0 (Adam/AdamW).
        adam_blocks: Adam only: per-block raw Grams, group index, sizes and calibration κ
            (:func:`lightning_ttp.dynamics.adam.simulate_adam`).
        seconds: wall-clock of the estimate.
        info: sizes, projection, method details.
        stability_cache: memo of what depends on the kernel only (the stability diagnostic's loss
            curvature and λmax per lr direction, a linear probe's Kronecker factors), filled by
            :func:`lightning_ttp.pipeline.simulate.simulate`, so what-if simulations on one estimate share
            it. Replace the Grams, not edit them, after a simulation.
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
    stability_cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return int(self.outputs.shape[0])

    @property
    def num_outputs(self) -> int:
        return int(self.outputs.shape[1])


def _prepared_targets(loss: Loss, targets: torch.Tensor, num_outputs: int, n: int) -> torch.Tensor:
    y = loss.prepare_targets(torch.as_tensor(targets).detach().cpu(), num_outputs)
    if y.shape[0] != n:
        raise ValueError(f"got {y.shape[0]} targets for {n} inputs")
    return y


def _info(kernel_seconds: float, groups: list[list[torch.nn.Parameter]], projection_dim: int | None,
          num_outputs: int, n: int, notes: list[str]) -> dict[str, Any]:
    return {"kernel_seconds": kernel_seconds, "num_parameters": [int(sum(p.numel() for p in g)) for g in groups],
            "projection_dim": projection_dim, "num_outputs": num_outputs, "num_samples": n, "notes": notes}


def _probe_outputs(model: torch.nn.Module, inputs: Any,
                   output_fn: Callable | None) -> tuple[tuple[int, ...], list[str]]:
    """The shape of the model's logits on a couple of samples, and a note when they had to be
    taken out of a tuple, a dict or a ``ModelOutput``."""
    with _eval_mode(model), torch.no_grad():
        raw = output_fn(model, inputs) if output_fn is not None else model(inputs)
    logits = logits_of(raw)
    notes = []
    if logits is not raw:
        where = "'logits'" if getattr(raw, "logits", None) is logits or isinstance(raw, dict) else "the first tensor"
        notes.append(f"the model returns a {type(raw).__name__}; its {where} is taken as the logits "
                     "(pass output_fn=... to choose another).")
    return tuple(logits.shape), notes


class PerSampleOutputs:
    """``output_fn`` with its rows regrouped per sample: ``(b·k, …)`` outputs of a batch of ``b``
    samples become ``(b, k, …)`` (a flattened token classifier's ``(B·T, C)`` logits give
    ``(B, T, C)``, the sequence outputs :class:`~lightning_ttp.dynamics.losses.TokenCrossEntropy`
    reads). Made by :func:`per_sample_view`."""

    def __init__(self, output_fn: Callable, rows_per_sample: int) -> None:
        self.output_fn = output_fn
        self.rows_per_sample = int(rows_per_sample)

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        out = self.output_fn(model, batch)
        out = out if isinstance(out, torch.Tensor) else logits_of(out)
        return out.reshape(num_samples_in(batch), self.rows_per_sample, *out.shape[1:])


def per_sample_view(model: torch.nn.Module, inputs: Any, targets: Any, loss: str | Loss | Callable = "cross_entropy",
                    output_fn: Callable | None = None) -> tuple[Loss, torch.Tensor, Callable | None, list[str]]:
    """``(loss, targets, output_fn, notes)`` with one row of outputs and targets per sample of ``inputs``.

    - An ``output_fn``/``target_fn`` pair that flattens sequences (``(B·T, C)`` logits and
      ``(B·T,)`` targets for B samples, as a token classifier's ``training_step`` feeds
      ``F.cross_entropy``) is regrouped per sample (:class:`PerSampleOutputs`; targets
      ``(B, T)``): the kernel's samples are the data set's samples, every token a term of the loss.
    - Sequence outputs ``(N, T, C)`` with ``(N, T)`` integer targets under a cross-entropy loss
      resolve to :class:`~lightning_ttp.dynamics.losses.TokenCrossEntropy` (``ignore_index``
      masking, mean over the labelled tokens like ``F.cross_entropy``).

    Anything else whose rows do not match the samples raises a ``ValueError`` that names the fix.
    """
    return _per_sample_view(model, inputs, targets, loss, output_fn)[:4]


def _per_sample_view(model, inputs, targets, loss, output_fn):
    """:func:`per_sample_view` and the per-sample output shape of the probe."""
    loss_obj = get_loss(loss)
    targets = torch.as_tensor(targets)
    n = sample_count(inputs)
    rows = int(targets.shape[0]) if targets.dim() else 1
    probe = index_batch(inputs, torch.arange(min(n, 2)))
    shape, notes = _probe_outputs(model, probe, output_fn)
    m = sample_count(probe)
    out_rows = shape[0] if shape else 1
    if rows != n or out_rows != m:
        k = rows // n if n else 0
        if output_fn is None or k < 2 or rows != k * n or out_rows != k * m:
            raise ValueError(
                f"the outputs have {out_rows} rows for {m} samples and the targets {rows} rows for {n} samples: "
                "return one row per sample from output_fn (e.g. (B, T, C) logits for (B, T) token targets), or "
                "flatten both output_fn and target_fn the same way (B·T rows each).")
        output_fn = PerSampleOutputs(output_fn, k)
        targets = targets.reshape(n, k, *targets.shape[1:])
        shape = (m, k, *shape[1:])
        notes.append(f"output_fn and target_fn give {k} rows per sample (flattened sequences): regrouped as "
                     f"{k} rows of one sample each.")
    if len(shape) == 3 and targets.dim() == 2 and not targets.is_floating_point():
        if not isinstance(loss_obj, TokenCrossEntropy):
            loss_obj = token_loss(loss_obj, int(shape[2]))
        notes.append(f"token-level task: outputs (N, {shape[1]}, {shape[2]}) with (N, {shape[1]}) targets; every "
                     f"token is a sample of the loss, targets equal to {loss_obj.ignore_index} are ignored.")
    return loss_obj, targets, output_fn, notes, shape


def _processes(sharding: Sharding | None, n: int) -> int:
    """The processes ``n`` kernel samples are split across (1: not split)."""
    return sharding.world_size if sharding is not None and sharding.active(n) else 1


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    with preserve_modes(model):
        model.eval()
        yield


def _jvp_w0(model, inputs, groups, output_fn) -> list[torch.Tensor]:
    """J_g · w_{0,g} per group with ``torch.func.jvp`` (central finite difference as fallback)."""
    from torch.func import functional_call, jvp

    wrapper = OutputModule(model, output_fn)
    names = {id(p): "m." + n for n, p in model.named_parameters()}
    out = []
    with _eval_mode(model), torch.no_grad():
        for group in groups:
            sub = {names[id(p)]: p.detach() for p in group}

            def fn(params, sub=sub):
                # buffers copied inside the transform: a layer may update one in place in forward
                own = {"m." + name: b.clone() for name, b in model.named_buffers()}
                return functional_call(wrapper, {**params, **own}, (inputs,), strict=False)

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
    n = sample_count(inputs)
    rng = np.random.default_rng(seed)
    nb = 1 if batch_size >= n else min(8, max(1, n // batch_size))
    sq = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with _eval_mode(model), torch.enable_grad():
        for _ in range(nb):
            idx = np.arange(n) if batch_size >= n else np.sort(rng.choice(n, batch_size, replace=False))
            idx_t = torch.as_tensor(idx)
            f = model_outputs(model, index_batch(inputs, idx_t), output_fn)
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
    batch_statistics: bool | None = None,
    parameter_scales: Mapping[torch.nn.Parameter, torch.Tensor] | None = None,
    sharding: Sharding | None = None,
) -> KernelEstimate:
    """f0 and the per-group empirical NTK Θ_g = J_g J_gᵀ (eq. 2) at the current weights w0.

    Uses :func:`lightning_ttp.kernel.empirical_ntk` (model in eval mode, left unchanged)
    with the optimiser's param groups. With weight decay it also computes
    J_g·w_{0,g} (one ``torch.func.jvp`` per group), which makes the weight-decay term of the
    discrete dynamics exact. For Adam/AdamW the Grams are computed per block of parameter
    tensors (one block per param group: more blocks cost as many Gram products per simulated
    step and did not change the error, ``benchmarks/prediction_cost.py``) and the second
    moments of mini-batch gradients of size ``batch_size`` at w0 calibrate the per-block
    adaptive scales (an approximation, see :mod:`lightning_ttp.dynamics.adam` and
    ``docs/prediction.md``); ``grams`` then hold the preconditioned kernel at w0, used by the
    ODE/SDE and the stability diagnostic. The preconditioned kernel Θ_P = J diag(1/(√v + ε)) Jᵀ goes
    through the engine's fast paths (``parameter_scales`` of :func:`lightning_ttp.kernel.empirical_ntk`),
    at about the cost and memory of the SGD kernel.

    Args:
        inputs, targets: the N0 kernel samples (inputs: tensor or tuple/dict of tensors).
        spec / optimizer: the optimiser (one of them); its params must belong to ``model``.
        kernel: "full", "trace" or "auto" (full if N0·C ≤ 2500).
        batch_statistics: SGD only: with BatchNorm layers in train mode, f0 and the Grams of the
            kernel samples as *one training batch* (the batched train-mode Jacobian,
            :func:`lightning_ttp.pipeline.batch_statistics.batch_statistics_state`) instead of eval mode;
            default (None): when the model has such layers, no ``projection_dim`` is set and the
            Jacobian fits ``lightning_ttp.pipeline.batch_statistics.JACOBIAN_MAX_BYTES``.
        parameter_scales: non-Adam optimisers only: ``{parameter: s}`` for Grams J_g diag(s²) J_gᵀ, a fixed
            diagonal preconditioner (e.g. Adam's at a later step of the run: s = (√v̂ + ε)^{-1/2}), through
            the engine's fast paths (:func:`lightning_ttp.kernel.empirical_ntk`); parameters not listed have s = 1.
        sharding: split the kernel's samples across data-parallel processes (a collective: every
            process calls with the same model, samples and options, and gets the same estimate):
            each runs the engine's passes, J·w0's rows and the batch-statistics Jacobian's rows of
            its shard only (:class:`lightning_ttp.kernel.Sharding`). Adam's second moments (a few
            mini-batch gradients) are computed by every process alike.
    """
    from ..kernel import empirical_ntk

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
    loss_obj, targets, output_fn, notes, shape = _per_sample_view(model, inputs, targets, loss, output_fn)
    c = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    if kernel == "auto":
        kernel = "full" if n * c <= FULL_KERNEL_MAX else "trace"
    adam = spec.kind in ("adam", "adamw")
    if adam and parameter_scales is not None:
        raise ValueError("parameter_scales is for non-Adam optimisers: for Adam/AdamW estimate_kernel derives the "
                         "preconditioner from the gradients at w0; pass an SGD spec over the same groups instead")
    groups = [list(g) for g in spec.params]
    blocks = _blocks(groups) if adam else None
    tensor_groups = [b[1] for b in blocks] if adam else groups
    nonempty = [i for i, g in enumerate(tensor_groups) if g]
    kernel_groups = [tensor_groups[i] for i in nonempty]
    kernel_fn = flat_output_fn(output_fn)
    if not adam and projection_dim is None and batch_statistics is not False:
        if batch_statistics or kernel_on_batch_statistics(model, n, c, sum(p.numel() for g in groups for p in g)):
            # the eval-mode kernel below is not computed at all: the batch-statistics one replaces it
            by_id = None if parameter_scales is None else {
                id(p): torch.as_tensor(parameter_scales.get(p, torch.ones_like(p))) for g in groups for p in g}
            f0, grams, _, jw = batch_statistics_state(model, inputs, groups, kernel=kernel, scales=by_id,
                                                      tangents={}, weight_decay=spec.has_weight_decay,
                                                      output_fn=output_fn, sharding=sharding)
            y = _prepared_targets(loss_obj, targets, c, n)
            info = _info(time.perf_counter() - started, groups, projection_dim, c, n, notes)
            info["batch_statistics"] = True
            info["processes"] = _processes(sharding, n)
            return KernelEstimate(f0.cpu(), y, grams, kernel, loss_obj, jw, False, time.perf_counter() - started,
                                  info)
    scales = parameter_scales
    if adam:
        flat = [p for g in groups for p in g]
        y_pre = loss_obj.prepare_targets(torch.as_tensor(targets).detach().cpu(), c)
        moments = _adam_second_moments(model, inputs, y_pre, loss_obj, flat, output_fn, batch_size or n, seed)
        # Floor v_d at 1 % of its tensor's mean: coordinates with a vanishing gradient at w0 would
        # otherwise get a 1/ε preconditioner that real Adam never applies once they move.
        moments = [torch.maximum(v, ADAM_V_FLOOR * v.mean()) for v in moments]
        eps_of = {id(p): spec.groups[gi].eps for gi, g in enumerate(groups) for p in g}
        # Θ_P = J diag(1/(√v + ε)) Jᵀ: the engine scales each per-sample gradient by s = (√v + ε)^{-1/2}
        scales = {p: (v.sqrt() + eps_of[id(p)]).rsqrt().to(p.device, p.dtype)
                  for p, v in zip(flat, moments, strict=True)}
        mom = dict(zip(map(id, flat), moments, strict=True))
        adam_rms = [float(torch.cat([mom[id(p)].reshape(-1) for p in b[1]]).sqrt().mean()) for b in blocks]
    ntk = empirical_ntk(model, inputs, output_fn=kernel_fn, kernel=kernel, projection_dim=projection_dim,
                        parameter_groups=kernel_groups, seed=seed, memory_budget=memory_budget,
                        parameter_scales=scales, sharding=sharding)
    f0 = ntk.outputs.detach().to(torch.float64)
    y = _prepared_targets(loss_obj, targets, c, n)
    size = n * c if kernel == "full" else n
    # the Grams stay on the model's device (the simulators run there) in the kernel's precision:
    # the simulators multiply in it and accumulate in float64
    raw = [torch.zeros(size, size, dtype=ntk.gram.dtype, device=ntk.gram.device) for _ in tensor_groups]
    for i, g in zip(nonempty, ntk.grams, strict=True):
        raw[i] = g.detach()
    if kernel == "trace":
        raw = [g / c for g in raw]
    info = _info(ntk.seconds, groups, projection_dim, c, n, notes)
    info["processes"] = ntk.world_size
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
    jw = (map_rows(sharding, lambda part: _jvp_w0(model, part, groups, output_fn), inputs, n)
          if spec.has_weight_decay else None)
    return KernelEstimate(f0.cpu(), y, grams, kernel, loss_obj, jw, adam, time.perf_counter() - started, info,
                          adam_blocks)




def standing_for(kernel: KernelEstimate, dataset_size: int | None) -> KernelEstimate:
    """The estimate with every Gram made to stand for the whole training set of ``dataset_size``
    samples (:func:`lightning_ttp.kernel.subset.stand_for_dataset`: each subset sample's own,
    unshared kernel term weighted N0/N); the estimate itself when the subset is the whole set.

    Every param group's Gram (and Adam's per-block Grams, which sum to them) takes its own share α,
    so each stays positive semi-definite. The shares are in ``info["idiosyncratic_share"]``."""
    n0 = kernel.num_samples
    n = int(dataset_size or n0)
    if n <= n0:
        return kernel
    if kernel.adam_blocks is not None:
        blocks = [stand_for_dataset(g, n0, n) for g in kernel.adam_blocks["grams"]]
        grams = [torch.zeros_like(kernel.grams[0]) for _ in kernel.grams]
        for (g, _), gi in zip(blocks, kernel.adam_blocks["group"], strict=True):
            grams[gi] += g
        adam_blocks = {**kernel.adam_blocks, "grams": [g for g, _ in blocks]}
        shares = [a for _, a in blocks]
    else:
        pairs = [stand_for_dataset(g, n0, n) for g in kernel.grams]
        grams, shares, adam_blocks = [g for g, _ in pairs], [a for _, a in pairs], None
    info = {**kernel.info, "idiosyncratic_share": shares, "dataset_size": n}
    return replace(kernel, grams=grams, adam_blocks=adam_blocks, info=info, stability_cache={})
