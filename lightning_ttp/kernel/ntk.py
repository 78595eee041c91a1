"""The empirical neural tangent kernel Θ = J Jᵀ of a model at its current weights.

Θ[(i,c),(j,c')] = ⟨∂f_c(x_i)/∂w, ∂f_c'(x_j)/∂w⟩ (eq. 2 of Zancato et al., "Predicting
Training Time Without Training", NeurIPS 2020), over the trainable parameters w.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from lightning_ttp.kernel.batch import batch_size, slice_batch
from lightning_ttp.kernel.fallback import ForwardFn, per_sample_jacobian
from lightning_ttp.kernel.layers import Capture, LayerAdapter, adapter_for
from lightning_ttp.kernel.memory import check_budget, default_budget
from lightning_ttp.kernel.modes import preserve_modes
from lightning_ttp.kernel.projection import PROJECTIONS
from lightning_ttp.kernel.shard import Sharding
from lightning_ttp.kernel.terms import TEMP_ELEMENTS, DenseTerm, Term, _gram_of_features, outer_flops

KERNELS = ("full", "trace")
#: the fields of a term that hold one row per sample (concatenated across chunks, gathered across processes)
SAMPLE_FIELDS = ("features", "inputs", "deltas", "ids", "images")
ParameterGroups = Sequence[Iterable[nn.Parameter] | dict[str, Any]]


@dataclasses.dataclass
class NTK:
    """An empirical NTK and the outputs it was taken at.

    Attributes:
        outputs: f0, the model's outputs (N, C) at the current weights (eval mode).
        gram: ``kernel="full"``: (N·C, N·C), sample-major (row i·C + c);
            ``kernel="trace"``: (N, N) = Σ_c Θ[(i,c),(j,c)].
        grams: one Gram per parameter group, in the order given; they sum to ``gram``.
        kernel: ``"full"`` or ``"trace"``.
        projection: ``None`` (exact) or the projection used; ``projection_dim`` its D'.
        num_parameters: trainable parameters counted, per group.
        methods: how each parameter's gradients were computed
            (``ghost``, ``materialised``, ``fallback:vmap``, ``fallback:loop``, or the projection).
        seconds: wall-clock time of the computation.
        timings: its parts in seconds: ``passes`` (forward + C backward per chunk, building the
            factors or random features), ``fallback`` (torch.func per-sample Jacobians),
            ``contraction`` (the Gram products) and ``gather`` (collectives, sharded only).
        world_size: processes the samples were split across (1: one process computed all).
        shard: ``(start, stop)`` of the samples whose passes this process ran.
    """

    outputs: torch.Tensor
    gram: torch.Tensor
    grams: list[torch.Tensor]
    kernel: str
    projection: str | None
    projection_dim: int | None
    num_parameters: list[int]
    methods: dict[str, str]
    seconds: float
    timings: dict[str, float]
    world_size: int = 1
    shard: tuple[int, int] | None = None

    @property
    def num_samples(self) -> int:
        return self.outputs.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.outputs.shape[1]


def empirical_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    kernel: str = "full",
    projection_dim: int | None = None,
    projection: str = "sparse",
    parameter_groups: ParameterGroups | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    parameter_scales: Mapping[nn.Parameter, torch.Tensor] | None = None,
    sharding: Sharding | None = None,
) -> NTK:
    """Compute the empirical NTK Gram matrix of ``model`` on ``inputs``.

    Θ[(i,c),(j,c')] = Σ_w ∂f_c(x_i)/∂w · ∂f_c'(x_j)/∂w (eq. 2 of Zancato et al., 2020) over
    parameters with ``requires_grad=True`` (frozen layers are excluded).

    The model is evaluated in **eval mode** (BatchNorm uses its running statistics, dropout
    is off), because per-sample gradients are otherwise ill-defined; every module's
    train/eval flag, the weights, ``requires_grad`` flags, ``.grad`` fields and the global RNG
    are left exactly as they were.

    How it is computed: one forward pass per chunk of samples with hooks on ``nn.Linear``,
    ``nn.Conv1d/2d``, ``nn.Embedding`` and the affine parameters of LayerNorm, GroupNorm and
    BatchNorm, then one batched backward per output for the cotangents δ. For each layer the
    cheaper of the "ghost" contraction Θ_l = Σ_{p,q} ⟨δ_icp, δ_jc'q⟩⟨a_ip, a_jq⟩ and the
    materialised per-sample gradient is used. Every other trainable parameter (custom modules,
    parameters used outside their module's forward, tied weights, modules called twice) goes
    through ``torch.func.vmap(jacrev)`` per sample, or an autograd loop where vmap cannot run.
    Each fast path is checked against autograd on two samples; a mismatch moves the layer to the
    fallback. The verdict is cached per model (module tree, parameter objects and groups,
    ``output_fn``, per-sample input shapes), so a second kernel of the same model skips the check;
    a cached fast path that the forward no longer calls exactly once is re-checked.

    Args:
        model: any ``nn.Module``.
        inputs: a tensor, or a tuple/list/dict of tensors sharing the sample dimension.
        output_fn: ``output_fn(model, inputs) -> (N, C)`` for models that take dict batches or
            return tuples/dicts; default ``model(inputs)``.
        kernel: ``"full"`` (N·C × N·C) or ``"trace"`` (N × N, Σ_c of the diagonal blocks — C² times
            smaller; the approximation Θ ≈ Θ_trace/C ⊗ I_C, see ``docs/kernel.md`` for its error).
        projection_dim: D' for a random projection of the per-sample gradients (Section 4 of the
            paper): E[Z Zᵀ] = Θ. ``None`` computes Θ exactly.
        projection: ``"sparse"`` (Achlioptas {−1, 0, +1}), ``"gaussian"``, or ``"kronecker"``
            (per layer, input and output sides projected separately to ≈ √D' each; cheap for wide
            layers; layers with at most D' parameters stay exact). Generated from ``seed`` on the fly.
        parameter_groups: lists of parameters (or an optimiser's ``param_groups``) → one Gram each in
            ``grams``, so a caller can weight each by its learning rate. Default: one group of all
            trainable parameters. Parameters in no group are not counted.
        chunk_size: samples per forward/backward pass; default from the memory budget.
        seed: seed of the projection (the same seed gives the same result).
        memory_budget: bytes the computation may use; default half of the free memory.
        parameter_scales: ``{parameter: s}`` with ``s`` of the parameter's shape: the kernel of the
            diagonally preconditioned gradient, Θ_P = J diag(s²) Jᵀ, i.e. the NTK of w = w0 + s ⊙ z in z
            (Adam at w0: s = (√v + ε)^{-1/2}). Parameters not listed have s = 1. Every fast path
            takes the scales: materialised gradients are scaled as they are formed, dense layers
            (one position) contract K_d(i, j) = Σ_a s_da² a_ia a_ja, embedding cotangents are
            scaled per token; the Kronecker projection of a scaled layer is a dense Gaussian one.
        sharding: split the samples across processes (:class:`lightning_ttp.kernel.shard.Sharding`;
            a collective: every process calls with the same model weights, inputs and options).
            Process r runs the forward and backward passes of its contiguous shard only; the
            per-sample factors (or random features, or fallback Jacobian rows) are all-gathered,
            each process contracts one block of the Gram's upper triangle, Θ[a_r:a_{r+1}, a_r:]
            (about the same products on every process; the same ghost or materialised choice as
            one process, made for all N), and the blocks are all-gathered, the lower triangle
            their transposes. Every process returns the same NTK, equal to the one-process NTK up to
            float rounding. Fewer than 2 samples per process: not split.

    Raises:
        ValueError: no trainable parameters, N = 0, outputs not (N, C) or not finite, bad options.
        NTKMemoryError: the request does not fit ``memory_budget`` (the message lists the options).
    """
    compute = functools.partial(
        _empirical_ntk, model, inputs, output_fn=output_fn, kernel=kernel, projection_dim=projection_dim,
        projection=projection, parameter_groups=parameter_groups, chunk_size=chunk_size, seed=seed,
        memory_budget=memory_budget, parameter_scales=parameter_scales, sharding=sharding)
    try:
        return compute(use_cached_probe=True)
    except _StaleProbe:
        forget_probes(model)
        return compute(use_cached_probe=False)


def _empirical_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    kernel: str = "full",
    projection_dim: int | None = None,
    projection: str = "sparse",
    parameter_groups: ParameterGroups | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    parameter_scales: Mapping[nn.Parameter, torch.Tensor] | None = None,
    sharding: Sharding | None = None,
    use_cached_probe: bool = True,
) -> NTK:
    started = time.perf_counter()
    _check_options(kernel, projection, projection_dim, chunk_size)
    n = batch_size(inputs)
    if n == 0:
        raise ValueError("`inputs` has no samples (N = 0): pass at least one sample.")
    groups, group_of = _resolve_groups(model, parameter_groups)
    scales = _resolve_scales(parameter_scales, group_of)
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    forward = ForwardFn(model, output_fn)
    projected = projection_dim is not None
    sharded = sharding is not None and sharding.active(n)
    lo, hi = sharding.bounds(n) if sharded else (0, n)

    device = _device(model)
    rng_devices = [device] if device.type == "cuda" else []
    with _eval_mode(model), torch.enable_grad(), torch.random.fork_rng(devices=rng_devices):
        adapters, num_outputs, per_sample, cached = _verified_adapters(model, forward, inputs, group_of,
                                                                        use_cached_probe)
        covered = {id(p) for a in adapters for p in a.parameters().values() if id(p) in group_of}
        fallback = [[p for p in group if id(p) not in covered] for group in groups]
        dtype = next(iter(group_of.values()))[1].dtype
        budget = memory_budget if memory_budget is not None else default_budget(_device(model))
        streamed, stored = _streamed(adapters, per_sample, n, num_outputs, kernel, projected, bool(scales))
        per_sample = {**per_sample, "stored": stored}
        chunk = chunk_size or _default_chunk(per_sample, budget, n, dtype)
        estimate = _estimate_bytes(
            n, num_outputs, len(groups), kernel, projection_dim, per_sample, chunk, fallback, dtype
        )
        check_budget(estimate, budget, num_samples=n, num_outputs=num_outputs, kernel=kernel, projected=projected)

        methods: dict[str, str] = {}
        timings = {"passes": 0.0, "fallback": 0.0, "contraction": 0.0, "gather": 0.0}
        outputs: list[torch.Tensor] = []
        per_group: dict[tuple[int, int], Any] = defaultdict(list)
        for start in range(lo, hi, chunk):  # this process's shard (all samples unless sharded)
            batch = slice_batch(inputs, start, min(start + chunk, hi))
            out, terms = _chunk_terms(forward, batch, adapters, group_of, fallback, names, methods, timings,
                                      stale=_StaleProbe if cached else RuntimeError, streamed=streamed, scales=scales)
            outputs.append(out.detach())
            tick = time.perf_counter()
            for key, term in terms.items():
                if not projected:
                    per_group[key].append(term)
                    continue
                features = _features(term, projection, projection_dim, seed, key)
                if key not in per_group:  # one buffer for the shard: no copy when the chunks are joined
                    per_group[key] = features.new_empty((hi - lo,) + features.shape[1:])
                per_group[key][start - lo : start - lo + features.shape[0]] = features
            timings["passes"] += time.perf_counter() - tick

    f0 = torch.cat(outputs)
    # sharded: this process contracts the upper-triangle block Θ[a:b, a:] against the samples [a, N)
    a, b = sharding.contraction_rows(n) if sharded else (0, n)
    rows = slice(0, b - a) if sharded else None
    unit = num_outputs if kernel == "full" else 1

    tick, gathering = time.perf_counter(), timings["gather"]
    parts = {key: chunks if projected else _concat(chunks) for key, chunks in per_group.items()}
    per_group.clear()
    if sharded:  # every shard's factors (or features) to every process; only the samples [a, N) are contracted
        tock = time.perf_counter()
        f0 = sharding.gather_rows(f0, n)
        for key, part in parts.items():
            parts[key] = (sharding.gather_rows(part, n)[a:] if projected else dataclasses.replace(
                part, **{f: sharding.gather_rows(getattr(part, f), n)[a:] for f in _sample_fields(part)}))
        timings["gather"] += time.perf_counter() - tock
    grams = []
    for g in range(len(groups)):
        gram = None
        for key in [key for key in parts if key[0] == g]:
            if projected:
                part = _gram_of_features(parts.pop(key), kernel, rows)
            else:
                part, how = parts.pop(key).gram(kernel, rows, samples=n)
                for name in _term_names(key, adapters, fallback, names, group_of):
                    methods.setdefault(name, how)
            gram = part if gram is None else gram + part
        if gram is None:
            gram = torch.zeros((b - a) * unit, (n - a) * unit, dtype=dtype, device=_device(model))
        grams.append(gram)
    if sharded:  # the upper-triangle blocks of every group, gathered at once; below them their transposes
        tock = time.perf_counter()
        grams = list(sharding.gather_upper(torch.stack(grams), n, unit).unbind(0))
        timings["gather"] += time.perf_counter() - tock
    if projected:
        for name in list(methods):
            methods[name] = f"{projection} projection ({methods[name]})"
    total = grams[0] if len(grams) == 1 else torch.stack(grams).sum(0)
    timings["contraction"] += time.perf_counter() - tick - (timings["gather"] - gathering)
    return NTK(
        outputs=f0,
        gram=total,
        grams=grams,
        kernel=kernel,
        projection=projection if projected else None,
        projection_dim=projection_dim,
        num_parameters=[sum(p.numel() for p in group) for group in groups],
        methods=methods,
        seconds=time.perf_counter() - started,
        timings=timings,
        world_size=sharding.world_size if sharded else 1,
        shard=(lo, hi),
    )


def _check_options(kernel: str, projection: str, projection_dim: int | None, chunk_size: int | None) -> None:
    if kernel not in KERNELS:
        raise ValueError(f'kernel must be "full" or "trace", got {kernel!r}.')
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}.")
    if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
        raise ValueError(f"projection_dim must be a positive int or None (exact), got {projection_dim!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}.")


def _resolve_groups(
    model: nn.Module, parameter_groups: ParameterGroups | None
) -> tuple[list[list[nn.Parameter]], dict[int, tuple[int, nn.Parameter]]]:
    in_model = {id(p) for p in model.parameters()}
    if parameter_groups is None:
        parameter_groups = [[p for p in model.parameters()]]
    groups: list[list[nn.Parameter]] = []
    group_of: dict[int, tuple[int, nn.Parameter]] = {}
    for g, group in enumerate(parameter_groups):
        params = group["params"] if isinstance(group, dict) else group
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        kept = []
        for p in params:
            if id(p) not in in_model:
                raise ValueError(
                    f"parameter group {g} holds a parameter of shape {tuple(p.shape)} that is not a parameter "
                    "of `model`: build the optimiser (or the groups) from this model's parameters."
                )
            if id(p) in group_of:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears in more than one parameter group.")
            if p.requires_grad:
                group_of[id(p)] = (g, p)
                kept.append(p)
        groups.append(kept)
    if not group_of:
        raise ValueError(
            "the model has no trainable parameters (none with requires_grad=True in the given groups): "
            "unfreeze the layers you fine-tune."
        )
    return groups, group_of


def _resolve_scales(
    parameter_scales: Mapping[nn.Parameter, torch.Tensor] | None, group_of: dict[int, tuple[int, nn.Parameter]]
) -> dict[int, torch.Tensor]:
    """``parameter_scales`` by parameter id, on each parameter's device and dtype, shapes checked."""
    scales: dict[int, torch.Tensor] = {}
    for p, s in (parameter_scales or {}).items():
        if id(p) not in group_of:
            continue  # frozen or in no group: not in the kernel
        s = torch.as_tensor(s).detach()
        if s.shape != p.shape:
            raise ValueError(
                f"parameter_scales: the scale of a parameter of shape {tuple(p.shape)} has shape {tuple(s.shape)}; "
                "give one scale per entry (the parameter's shape)."
            )
        scales[id(p)] = s.to(device=p.device, dtype=p.dtype)
    return scales


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: nn.Module):
    with preserve_modes(model):
        model.eval()
        yield


def _check_outputs(out: Any, n: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the model's outputs must be a (N, C) tensor with N={n}, got {shape}. Pass "
            "output_fn=lambda model, inputs: ... returning the (N, C) logits (e.g. add .unsqueeze(-1) for one output)."
        )
    if not torch.isfinite(out).all():
        raise ValueError("the model's outputs contain NaN or inf at the current weights: the kernel is undefined.")
    return out


def _shared_parameters(model: nn.Module) -> set[int]:
    owners: dict[int, int] = defaultdict(int)
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] += 1
    return {pid for pid, count in owners.items() if count > 1}


def _verified_adapters(
    model: nn.Module,
    forward: ForwardFn,
    inputs: Any,
    group_of: dict[int, tuple[int, nn.Parameter]],
    use_cached: bool = True,
) -> tuple[list[LayerAdapter], int, dict[str, float], bool]:
    """Fast-path adapters that are called once per forward and agree with autograd on a probe.

    Also returns C, per-sample element counts (for the memory estimate) and whether the verdict
    came from the cache.
    """
    shared = _shared_parameters(model)
    candidates = []
    for module in model.modules():
        adapter = adapter_for(module)
        if adapter is None:
            continue
        params = adapter.parameters()
        if any(id(p) in group_of for p in params.values()) and not any(id(p) in shared for p in params.values()):
            candidates.append(adapter)
    key = _probe_key(model, forward, inputs, group_of)
    cached = _PROBES.get(model, {}).get(key) if use_cached else None
    if cached is not None:
        indices, c, per_sample = cached
        return [candidates[i] for i in indices], c, dict(per_sample), True
    probe_n = min(2, batch_size(inputs))
    probe = slice_batch(inputs, 0, probe_n)
    with Capture(candidates, probe_n) as capture:
        out = _check_outputs(forward(probe), probe_n)
    good = [a for i, a in enumerate(candidates) if a.calls == 1 and i not in capture.failed]
    good = [a for a in good if a.output is not None and a.output.requires_grad]
    params = [p for a in good for p in a.parameters().values() if id(p) in group_of]
    # the gradient of one output of sample 0 only: our per-sample gradient of sample 0 must equal
    # autograd's, and no cotangent may reach the rows of the other samples
    grads = torch.autograd.grad(out[0, 0], [a.output for a in good] + params, allow_unused=True) if good else ()
    out_grads, param_grads = grads[: len(good)], dict(zip(map(id, params), grads[len(good) :]))
    verified = []
    for adapter, grad in zip(good, out_grads):
        delta = adapter.delta_view(torch.zeros_like(adapter.output) if grad is None else grad)
        summed = adapter.summed_gradients(delta)
        trained = [(role, p) for role, p in adapter.parameters().items() if id(p) in group_of]
        own_rows_only = not delta[1:].any()
        if own_rows_only and all(_close(summed[role], param_grads[id(p)], p) for role, p in trained):
            verified.append(adapter)
    c = out.shape[1]
    per_sample = {
        "stored": sum(a.stored_numel() + c * a.output.numel() for a in verified) / probe_n,
        "activations": sum(a.output.numel() + a.factor.numel() for a in candidates if a.factor is not None) / probe_n,
        # per verified layer: its factors' elements per sample, and per group (outer dims or None, parameters)
        "layers": tuple(
            ((a.stored_numel() + c * a.output.numel()) / probe_n,
             tuple((g, a.outer_dims(roles), sum(a.parameters()[r].numel() for r in roles))
                   for g, roles in _roles_by_group(a, group_of).items()))
            for a in verified
        ),
    }
    for adapter in candidates:
        adapter.factor, adapter.output = None, None
    position = {id(a): i for i, a in enumerate(candidates)}
    _PROBES.setdefault(model, {})[key] = ([position[id(a)] for a in verified], c, dict(per_sample))
    return verified, c, per_sample, False


class _StaleProbe(RuntimeError):
    """A cached fast path was not called exactly once by this forward: verify again."""


# Verified fast paths per model, keyed by everything the verification depends on (see _probe_key):
# re-estimating the kernel of the same model (closed-loop refinement, what-if studies, a new
# subset) skips the probe's forward, backward and comparisons. Entries die with the model.
_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple]] = weakref.WeakKeyDictionary()


def _probe_key(model: nn.Module, forward: ForwardFn, inputs: Any, group_of: dict[int, tuple[int, nn.Parameter]]):
    """What the probe's verdict depends on: the module tree, the parameter objects, their shapes,
    dtypes, devices and groups, the ``output_fn`` object, and the inputs' structure and per-sample
    shapes (not the number of samples, not the weights' values)."""
    leaves, spec = tree_flatten(inputs)
    return (
        tuple((name, type(m)) for name, m in model.named_modules(remove_duplicate=False)),
        tuple((name, id(p), tuple(p.shape), p.dtype, p.device, group_of.get(id(p), (None,))[0])
              for name, p in model.named_parameters(remove_duplicate=False)),
        _callable_key(forward.output_fn),
        str(spec),
        tuple((tuple(t.shape[1:]), t.dtype, t.device) if isinstance(t, torch.Tensor) else repr(t) for t in leaves),
    )


def _callable_key(fn: Callable | None) -> Any:
    """A function by its code and the objects its closure holds, a ``functools.partial`` by its
    function and arguments (a wrapper that a caller creates afresh around the same user function
    gets the same key); other callables by identity."""
    if isinstance(fn, functools.partial):
        held_kw = tuple((k, _callable_key(v) if callable(v) else id(v)) for k, v in sorted(fn.keywords.items()))
        return _callable_key(fn.func), tuple(_callable_key(a) if callable(a) else id(a) for a in fn.args), held_kw
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn
    held = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = None
        held.append(_callable_key(value) if callable(value) else id(value))
    return code, tuple(held)


def forget_probes(model: nn.Module) -> None:
    """Drop the cached fast-path verification of ``model`` (the next kernel probes again)."""
    _PROBES.pop(model, None)


def _close(ours: torch.Tensor, reference: torch.Tensor | None, p: nn.Parameter) -> bool:
    if reference is None:
        reference = torch.zeros_like(p)
    if reference.is_sparse:
        reference = reference.to_dense()
    scale = reference.abs().max().item() + ours.abs().max().item()
    tol = 1e-4 if p.dtype == torch.float64 else 2e-3
    return bool((ours - reference).abs().max().item() <= tol * scale + 1e-12)


def _default_chunk(per_sample: dict[str, float], budget: int, n: int, dtype: torch.dtype) -> int:
    # the forward graph (with the ops between hooked layers), our output clones and the backward
    # each hold about one copy of the hooked layers' activations
    per_sample_bytes = 4 * torch.empty((), dtype=dtype).element_size() * max(per_sample["activations"], 1.0)
    return int(max(1, min(n, budget // 4 // per_sample_bytes)))


def _estimate_bytes(
    n: int,
    c: int,
    num_groups: int,
    kernel: str,
    projection_dim: int | None,
    per_sample: dict[str, float],
    chunk: int,
    fallback: list[list[nn.Parameter]],
    dtype: torch.dtype,
) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    rows = n * c if kernel == "full" else n
    grams = (num_groups + (num_groups > 1)) * rows * rows
    fallback_params = sum(p.numel() for group in fallback for p in group)
    if projection_dim is None:
        stored = n * (per_sample["stored"] + c * fallback_params)
        temporaries = 2 * TEMP_ELEMENTS + (n * c) ** 2
    else:
        stored = num_groups * n * c * projection_dim
        temporaries = chunk * (per_sample["stored"] + c * fallback_params)
    activations = 4 * chunk * per_sample["activations"]
    return int(size * (grams + stored + temporaries + activations))


def _roles_by_group(adapter: LayerAdapter, group_of: dict[int, tuple[int, nn.Parameter]]) -> dict[int, list[str]]:
    by_group: dict[int, list[str]] = defaultdict(list)
    for role, p in adapter.parameters().items():
        if id(p) in group_of:
            by_group[group_of[id(p)][0]].append(role)
    return by_group


def _streamed(
    adapters: list[LayerAdapter], per_sample: dict[str, Any], n: int, c: int, kernel: str, projected: bool, scaled: bool
) -> tuple[set[tuple[int, int]], float]:
    """The (group, layer) terms whose per-sample gradients are formed output by output during the
    backward passes (no cotangents kept), and the elements stored per sample with that choice.

    Exact kernels stream every term whose Gram is materialised anyway (norm layers, lone biases,
    and affine layers where the materialised contraction needs fewer multiply-adds than the ghost
    one over all ``n`` samples); scaled (preconditioned) kernels also every term that a projection
    will project. Embedding tables stay factored.
    """
    streamed: set[tuple[int, int]] = set()
    stored = 0.0
    for i, (adapter, (factored, groups)) in enumerate(zip(adapters, per_sample["layers"])):
        kept = False
        for g, dims, params in groups:
            if adapter.factored_only or (projected and not scaled):
                stream = False
            elif dims is None or projected:
                stream = True
            else:
                ghost, materialised = outer_flops(n, c, *dims, kernel, scaled=scaled)
                stream = materialised < ghost
            if stream:
                streamed.add((g, i))
                stored += c * params
            kept = kept or not stream
        stored += factored if kept else 0.0
    return streamed, stored


def _chunk_terms(
    forward: ForwardFn,
    batch: Any,
    adapters: list[LayerAdapter],
    group_of: dict[int, tuple[int, nn.Parameter]],
    fallback: list[list[nn.Parameter]],
    names: dict[int, str],
    methods: dict[str, str],
    timings: dict[str, float],
    stale: type[RuntimeError] = RuntimeError,
    streamed: set[tuple[int, int]] = frozenset(),
    scales: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[tuple[int, int], Term]]:
    """f0 on one chunk and its terms, keyed by (group, index): index i ≥ 0 is adapter i, −(g+1) the
    fallback of group g. The index seeds the term's random projection. ``streamed`` terms (see
    :func:`_streamed`) are formed during the backward passes; ``scales`` by parameter id."""
    scales = scales or {}
    n = batch_size(batch)
    tick = time.perf_counter()
    with Capture(adapters, n) as capture:
        out = _check_outputs(forward(batch), n)
    if capture.failed or any(a.calls != 1 for a in adapters):
        raise stale("a layer behaved differently on this chunk than on the probe; pass a fixed batch.")
    c = out.shape[1]
    roles = [_roles_by_group(adapter, group_of) for adapter in adapters]
    gradient_fns = [
        {g: adapter.gradient_fn(r, adapter.scale_of(r, scales)) for g, r in by_group.items() if (g, i) in streamed}
        for i, (adapter, by_group) in enumerate(zip(adapters, roles))
    ]
    factored = {i: [] for i, by_group in enumerate(roles) if any((g, i) not in streamed for g in by_group)}
    sizes = {(g, i): sum(adapter.parameters()[role].numel() for role in r)
             for i, (adapter, by_group) in enumerate(zip(adapters, roles)) for g, r in by_group.items()}
    features: dict[tuple[int, int], torch.Tensor] = {}  # (C, n, k): output-major, written per backward
    streaming = 0.0
    if adapters:
        outs = [a.output for a in adapters]
        for k in range(c):
            per_layer = torch.autograd.grad(out[:, k].sum(), outs, retain_graph=k < c - 1, allow_unused=True)
            tock = time.perf_counter()
            for i, grad in enumerate(per_layer):
                grad = torch.zeros_like(outs[i]) if grad is None else grad
                if i in factored:
                    factored[i].append(grad)
                for g, fn in gradient_fns[i].items():
                    if (g, i) not in features:
                        features[(g, i)] = grad.new_empty((c, n, sizes[(g, i)]))
                    fn(adapters[i].delta_view(grad), features[(g, i)][k])
            streaming += time.perf_counter() - tock
            del per_layer, grad
    terms: dict[tuple[int, int], Term] = {}
    for i, adapter in enumerate(adapters):
        if i in factored:
            stacked = adapter.stacked_deltas(factored.pop(i))  # (n, C, P, d)
        for g, r in roles[i].items():
            if (g, i) in streamed:
                terms[(g, i)] = DenseTerm(features.pop((g, i)).transpose(0, 1))
            else:
                terms[(g, i)] = adapter.term(stacked, r, adapter.scale_of(r, scales))
        adapter.factor, adapter.output = None, None
    timings["passes"] += time.perf_counter() - tick - streaming
    timings["contraction"] += streaming
    tick = time.perf_counter()
    for g, params in enumerate(fallback):
        if params:
            jac, how = per_sample_jacobian(forward, ["model." + names[id(p)] for p in params], params, batch)
            if any(id(p) in scales for p in params):
                jac = jac * torch.cat([scales.get(id(p), torch.ones_like(p)).reshape(-1) for p in params])
            terms[(g, -(g + 1))] = DenseTerm(jac.detach())
            for p in params:
                methods[names[id(p)]] = f"fallback:{how}"
    timings["fallback"] += time.perf_counter() - tick
    return out, terms


def _features(term: Term, projection: str, dim: int, seed: int, key: tuple[int, int]) -> torch.Tensor:
    index = key[1]
    if projection == "kronecker":
        return term.kronecker_features(dim, seed=seed, term=index)
    return term.project(dim, seed=seed, term=index, kind=projection)


def _sample_fields(term: Term) -> list[str]:
    """The names of ``term``'s per-sample tensors (one row per sample; others, like a layer's
    preconditioner ``scale``, are shared by all samples)."""
    return [f.name for f in dataclasses.fields(term) if f.name in SAMPLE_FIELDS]


def _concat(chunks: list[Term]) -> Term:
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]
    return dataclasses.replace(first, **{name: torch.cat([getattr(t, name) for t in chunks])
                                         for name in _sample_fields(first)})


def _term_names(
    key: tuple[int, int],
    adapters: list[LayerAdapter],
    fallback: list[list[nn.Parameter]],
    names: dict[int, str],
    group_of: dict[int, tuple[int, nn.Parameter]],
) -> list[str]:
    group, index = key
    if index < 0:
        return [names[id(p)] for p in fallback[group]]
    params = adapters[index].parameters().values()
    return [names[id(p)] for p in params if id(p) in group_of and group_of[id(p)][0] == group]


