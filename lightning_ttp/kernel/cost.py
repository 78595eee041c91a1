"""What an empirical NTK will cost, before computing it.

From the probe (the layers the engine will use and their shapes) and one timed forward plus C
backward passes on a few samples, :func:`estimate_ntk_cost` predicts for N samples

    seconds ≈ N · t_pass + (contraction multiply-adds) / r + t_fallback,

with t_pass the measured seconds per sample of one forward and C backward passes, r the
multiply-add rate of a dense matrix product measured on the model's device and dtype, and the
contraction counted per layer exactly as the engine chooses it (the cheaper of ghost and
materialised, :func:`~lightning_ttp.kernel.terms.outer_flops`; random features and their Gram
with a projection). Parameters without a fast path (the fallback) are charged one more set of
passes plus their Gram. ``bytes`` is the engine's own peak-memory estimate. Small probes carry
per-call overheads, so the passes are rather over- than under-estimated.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_ttp.kernel.batch import batch_size, slice_batch
from lightning_ttp.kernel.fallback import ForwardFn
from lightning_ttp.kernel.memory import default_budget
from lightning_ttp.kernel.ntk import (
    ParameterGroups,
    _check_options,
    _chunk_terms,
    _default_chunk,
    _device,
    _estimate_bytes,
    _eval_mode,
    _resolve_groups,
    _streamed,
    _term_names,
    _verified_adapters,
)
from lightning_ttp.kernel.terms import ConvTerm, DenseTerm, IndexTerm, OuterTerm, Term, index_flops, outer_flops

__all__ = ["NTKCost", "NTKCount", "count_ntk_macs", "estimate_ntk_cost"]


@dataclasses.dataclass
class NTKCost:
    """The predicted cost of ``empirical_ntk`` on ``num_samples`` samples.

    Attributes:
        seconds: predicted wall-clock, ``passes_seconds + contraction_seconds + fallback_seconds``.
        passes_seconds: N × the measured seconds per sample of one forward and C backward passes.
        contraction_flops: multiply-adds of the Gram contractions (or random features + their Grams).
        contraction_seconds: ``contraction_flops / flop_rate``.
        fallback_seconds: the fallback's per-sample Jacobians (one more set of passes) and Gram.
        flop_rate: measured multiply-adds per second of a dense product on the model's device.
        bytes: the engine's peak-memory estimate.
        layers: per fast-path term (its parameter names joined by "+"), (method, multiply-adds);
            ``method`` as ``NTK.methods`` names it.
        fallback_parameters: parameters without a fast path.
    """

    num_samples: int
    num_outputs: int
    kernel: str
    projection_dim: int | None
    seconds: float
    passes_seconds: float
    contraction_flops: float
    contraction_seconds: float
    fallback_seconds: float
    flop_rate: float
    bytes: int
    layers: dict[str, tuple[str, float]]
    fallback_parameters: int


def measure_flop_rate(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """Multiply-adds per second of a (size × size) @ (size × size) product (best of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - tick)
    return size**3 / max(best, 1e-9)


def _shape(term: Term) -> tuple[int, int, int, int, int]:
    """(C, positions P, d_in, d_out, parameters) of a term; d_in = 1 for dense features and tables."""
    if isinstance(term, DenseTerm):
        c, k = term.features.shape[1:]
        return c, 1, 1, k, k
    c, p, d_out = term.deltas.shape[1:]
    if isinstance(term, ConvTerm):
        d_in = term.images.shape[1] * math.prod(term.geometry[0]) + term.bias
    elif isinstance(term, OuterTerm):
        d_in = term.inputs.shape[-1]
    else:
        assert isinstance(term, IndexTerm)
        return c, p, 1, d_out, term.vocab * d_out
    return c, p, d_in, d_out, d_in * d_out


def term_flops(term: Term, kernel: str, n: int, projection_dim: int | None = None,
               projection: str = "sparse") -> tuple[str, float]:
    """(method, multiply-adds) of one term's Gram over ``n`` samples, as the engine would compute it."""
    c, p, d_in, d_out, k = _shape(term)
    rows, cc = n * c, (c if kernel == "trace" else c * c)
    if projection_dim is not None:
        if k <= projection_dim and (projection == "kronecker" or isinstance(term, DenseTerm)):
            dim, features = k, 0.0  # kept exact
        elif projection == "kronecker" and not isinstance(term, DenseTerm):
            k_in = min(d_in, math.ceil(math.sqrt(projection_dim)))
            k_out = min(d_out, max(1, projection_dim // k_in))
            dim = k_in * k_out
            features = n * p * d_in * k_in + rows * p * (d_out * k_out + dim)
        else:
            dim, features = projection_dim, rows * k * projection_dim
        return f"{projection} projection", float(features + n * n * cc * dim)
    if isinstance(term, DenseTerm):
        return "materialised", float(n * n * cc * k)
    if isinstance(term, IndexTerm):
        ghost, materialised = index_flops(n, c, p, d_out, min(term.vocab, n * p), kernel)
    else:
        ghost, materialised = outer_flops(n, c, p, d_in, d_out, kernel)
    return ("ghost", ghost) if ghost <= materialised else ("materialised", materialised)


@dataclasses.dataclass
class _Probe:
    """What the engine will do on a model, found on a few samples: its verified fast paths, their
    terms (shapes only matter), the fallback parameters, C, and the passes' seconds (if timed)."""

    adapters: list
    terms: dict
    fallback: list[list[nn.Parameter]]
    num_outputs: int
    per_sample: dict[str, Any]
    group_of: dict
    groups: list[list[nn.Parameter]]
    names: dict[int, str]
    device: torch.device
    samples: int
    pass_seconds: float


def _probe(model: nn.Module, inputs: Any, output_fn, parameter_groups, probe_samples: int, repeats: int) -> _Probe:
    available = batch_size(inputs)
    if available < 1:
        raise ValueError("the NTK cost needs at least one sample in `inputs`.")
    groups, group_of = _resolve_groups(model, parameter_groups)
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    forward = ForwardFn(model, output_fn)
    device = _device(model)
    k = max(1, min(probe_samples, available))
    rng_devices = [device] if device.type == "cuda" else []
    with _eval_mode(model), torch.enable_grad(), torch.random.fork_rng(devices=rng_devices):
        adapters, c, per_sample, _ = _verified_adapters(model, forward, inputs, group_of)
        covered = {id(p) for a in adapters for p in a.parameters().values() if id(p) in group_of}
        fallback = [[p for p in group if id(p) not in covered] for group in groups]
        seconds = []
        for _ in range(repeats):  # the best of several: the first run also pays one-time allocations
            timings = {"passes": 0.0, "fallback": 0.0, "contraction": 0.0}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _, terms = _chunk_terms(forward, slice_batch(inputs, 0, k), adapters, group_of, [[] for _ in groups],
                                    names, {}, timings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(timings["passes"])
    return _Probe(adapters, terms, fallback, c, per_sample, group_of, groups, names, device, k, min(seconds))


def _contraction(probe: _Probe, kernel: str, n: int, projection_dim: int | None,
                 projection: str) -> tuple[dict[str, tuple[str, float]], float, int, float]:
    """(per-layer (method, MACs), the fast paths' MACs, fallback parameters, the fallback's Gram MACs)."""
    layers, flops = {}, 0.0
    for key, term in probe.terms.items():
        method, cost = term_flops(term, kernel, n, projection_dim, projection)
        layers["+".join(_term_names(key, probe.adapters, probe.fallback, probe.names, probe.group_of))] = (method, cost)
        flops += cost
    fb_params = sum(p.numel() for group in probe.fallback for p in group)
    rows = n * probe.num_outputs if kernel == "full" else n
    fb_flops = float(rows * rows * (fb_params if projection_dim is None else min(fb_params, projection_dim)))
    return layers, flops, fb_params, fb_flops


@dataclasses.dataclass
class NTKCount:
    """The multiply-adds of ``empirical_ntk`` on ``num_samples`` samples that do not depend on the
    machine: the Gram contractions as the engine chooses them, and the fallback's parameters.

    Attributes:
        num_outputs: C.
        contraction_macs: the fast paths' Gram contractions (the cheaper of ghost and materialised per layer).
        fallback_parameters: parameters without a fast path (each sample's Jacobian formed by torch.func).
        fallback_macs: the fallback's Gram, rows² × its parameters.
    """

    num_samples: int
    num_outputs: int
    kernel: str
    contraction_macs: float
    fallback_parameters: int
    fallback_macs: float


def count_ntk_macs(
    model: nn.Module,
    inputs: Any,
    *,
    num_samples: int,
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    kernel: str = "full",
    parameter_groups: ParameterGroups | None = None,
    probe_samples: int = 2,
) -> NTKCount:
    """Count (never time) what ``empirical_ntk(model, inputs, kernel=kernel)`` contracts on
    ``num_samples`` samples: the same model and arguments give the same count on any machine.

    One forward and C backward passes on ``probe_samples`` samples find the engine's fast paths and
    their shapes (model and RNG left as they were).
    """
    _check_options(kernel, "sparse", None, None)
    probe = _probe(model, inputs, output_fn, parameter_groups, probe_samples, repeats=1)
    _, flops, fb_params, fb_flops = _contraction(probe, kernel, int(num_samples), None, "sparse")
    return NTKCount(int(num_samples), probe.num_outputs, kernel, flops, fb_params, fb_flops)


def estimate_ntk_cost(
    model: nn.Module,
    inputs: Any,
    *,
    num_samples: int | None = None,
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    kernel: str = "full",
    projection_dim: int | None = None,
    projection: str = "sparse",
    parameter_groups: ParameterGroups | None = None,
    probe_samples: int = 8,
    memory_budget: int | None = None,
) -> NTKCost:
    """Predict the cost of ``empirical_ntk(model, inputs, ...)`` on ``num_samples`` samples.

    ``inputs`` need only hold a few samples (``probe_samples`` of them are run: one forward and
    C backward passes, timed); ``num_samples`` (default: all of ``inputs``) is the N to predict
    for. The options mean what they mean for :func:`~lightning_ttp.kernel.empirical_ntk`; the
    model and the global RNG are left as they were. Costs about ``probe_samples / N`` of the
    kernel's passes (two forwards and 2·C backward passes on ``probe_samples`` samples).
    """
    _check_options(kernel, projection, projection_dim, None)
    available = batch_size(inputs)
    n = available if num_samples is None else int(num_samples)
    if n < 1 or available < 1:
        raise ValueError("estimate_ntk_cost needs at least one sample in `inputs` and num_samples >= 1.")
    probe = _probe(model, inputs, output_fn, parameter_groups, probe_samples, repeats=2)
    c, device = probe.num_outputs, probe.device
    dtype = next(iter(probe.group_of.values()))[1].dtype
    rate = measure_flop_rate(device, dtype)
    layers, flops, fb_params, fb_flops = _contraction(probe, kernel, n, projection_dim, projection)
    passes = probe.pass_seconds / probe.samples * n
    fb_seconds = (passes + fb_flops / rate) if fb_params else 0.0
    budget = memory_budget if memory_budget is not None else default_budget(device)
    _, stored = _streamed(probe.adapters, probe.per_sample, n, c, kernel, projection_dim is not None, False)
    per_sample = {**probe.per_sample, "stored": stored}
    chunk = _default_chunk(per_sample, budget, n, dtype)
    nbytes = _estimate_bytes(n, c, len(probe.groups), kernel, projection_dim, per_sample, chunk, probe.fallback,
                             dtype)
    return NTKCost(
        num_samples=n,
        num_outputs=c,
        kernel=kernel,
        projection_dim=projection_dim,
        seconds=passes + flops / rate + fb_seconds,
        passes_seconds=passes,
        contraction_flops=flops,
        contraction_seconds=flops / rate,
        fallback_seconds=fb_seconds,
        flop_rate=rate,
        bytes=nbytes,
        layers=layers,
        fallback_parameters=fb_params,
    )
