"""A cost cap for the prediction, from counts: the same call gives the same choice on any machine.

The exact kernel costs O(N·C) backward passes plus the Gram contractions, and the simulation one
product with the Gram's batch rows per simulated step, so on a large model and a short run a
256-sample prediction can cost more than the run it predicts. This module decides, *before*
computing anything expensive and *without timing anything*, whether the kernel subset or its kind
must give way. Everything is counted in multiply-adds (MACs) from the model's shapes and the
plan, so the choice depends on the model, the data's shapes, the optimiser and the arguments
only, never on the machine's speed or load:

1. F, the forward MACs of one sample: ``torch.utils.flop_counter.FlopCounterMode`` on one forward
   of up to ``PROBE_SAMPLES`` samples (eval mode, no gradient: no buffer or RNG is touched), at
   least the trainable parameter count (layers the counter does not see, e.g. embeddings, cost
   about one MAC per parameter they touch);
2. the run: T · (B · 3F + ``STEP_OVERHEAD_MACS``) — forward and backward (≈ 2 forwards) of every
   sample of a step, and a fixed count per step for the optimiser and the framework's own work;
3. the kernel: N · (1 + 2C) · F for the forward and C backward passes (on a model that trains on
   batch statistics, SGD-type: N · F · (1 + 2NC), one backward of the whole subset batch per output
   row, and the dense Gram (NC)² · P, :func:`batch_statistics_macs`); the Gram contractions as
   the engine will compute them (:func:`lightning_ttp.kernel.count_ntk_macs`: the cheaper of ghost
   and materialised per layer, the fallback's rows² · parameters); J·w0 under weight decay
   (3F per sample and param group) and Adam's second moments (up to 8 training batches, 3F per
   sample);
4. the simulation: ``continuation`` · T steps of P paths × |B'| · C · N·C MACs (mini-batches; the
   full-batch product (N·C)² with one path; C² fewer for the trace kernel), plus
   ``SIM_STEP_OVERHEAD_MACS`` per step, plus the stability report (``LANCZOS_PRODUCTS`` products
   with each Gram);
5. each part's count weighted by what one of its multiply-adds costs against one of a training
   step (``WEIGHTS``: the Gram contraction's large dense products run an order of magnitude
   faster per multiply-add than a training step's small batches), constants calibrated once.

Data-parallel processes (``processes`` > 1, the kernel sharded across them:
:class:`lightning_ttp.kernel.Sharding`) each run 1/``processes`` of the kernel's passes and
contractions and of the run's steps' samples, but the extras and the simulation in full: the cap
compares one process's counts, (passes + contraction)/``processes`` + extras + simulation against
``budget`` × run/``processes``.

The policy is accuracy first (:func:`choose_kernel`): the exact kernel on every sample of the
subset, unless the whole prediction counts more than ``budget`` × the run (default 1: the
prediction may cost as much as the run it predicts before it gives up accuracy) *and* more than
``FLOOR_MACS``; only then the largest candidate subset (×¾ steps down to ``MIN_SAMPLES``) that
fits, with the trace kernel (Θ ≈ K ⊗ I_C, a C² smaller Gram) preferred on more samples to the
exact kernel on fewer; when nothing fits, the trace kernel on ``MIN_SAMPLES`` with a note. The
choice, each part's count and the reason are reported (:class:`KernelChoice`, in the prediction's
diagnostics). Pure torch: no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..dynamics import OptimizerSpec
from ..kernel import count_ntk_macs
from ..kernel.batch import batch_size as sample_count
from ..kernel.modes import preserve_modes
from .batch_statistics import kernel_on_batch_statistics
from .data import take
from .estimate import FULL_KERNEL_MAX
from .lookahead import lookahead_steps
from .outputs import flat_output_fn, model_outputs
from .plan import RunPlan

__all__ = ["FLOOR_MACS", "LOOKAHEAD_SHARE", "MIN_SAMPLES", "KernelChoice", "choose_kernel", "forward_macs",
           "prediction_macs", "run_macs"]

#: the smallest kernel subset the cap chooses (smaller subsets bias the simulation)
MIN_SAMPLES = 64
#: a prediction of fewer MACs than this is never shrunk (a few seconds of one CPU core)
FLOOR_MACS = 2e10
#: a training step's optimiser and framework work (data loading, hooks, logging), as MACs
STEP_OVERHEAD_MACS = 2e6
#: a simulated step's fixed work (some 35 small tensor operations), as MACs
SIM_STEP_OVERHEAD_MACS = 1e6
#: What one multiply-add of each kind of work costs against one of a training step (whose
#: batches are small and whose operations are many). The Gram contractions are large dense
#: products, the kernel's passes run on chunks of many samples, the simulation on small products:
#: constants calibrated once on ``benchmarks/budget.py`` (the seconds per counted GMAC of each part
#: on one CPU core: run 0.63, contraction 0.035, simulation 0.11), not measured per call. The
#: batch-statistics kernel's passes (one backward of the whole subset batch per output row) ran at
#: 0.20 s per counted GMAC on ``benchmarks/defaults.py``'s BatchNorm CNN with one backward per row,
#: 0.18 / 0.10 s on 128 / 256 samples in batched backwards (``ROW_CHUNK``; one-off timings): the weight
#: keeps the slower end.
WEIGHTS = {"passes": 0.5, "contraction": 0.05, "extras": 1.0, "simulation": 0.2, "batch_statistics": 0.3}
#: products with each Gram of the stability report (Lanczos iterations, a few lr directions)
LANCZOS_PRODUCTS = 60
#: the look-ahead runs only when it counts at most this share of the run (and fits the cap), or
#: when the whole prediction stays under the floor
LOOKAHEAD_SHARE = 0.1
#: samples run through the forward that counts F
PROBE_SAMPLES = 4


@dataclass
class KernelChoice:
    """What the cost cap chose, and why (all costs in multiply-adds, counted, never timed).

    Attributes:
        num_samples: kernel subset size N.
        kernel: "full" or "trace".
        predicted_macs: the whole prediction's count at that choice.
        budget_macs: ``max(budget × run_macs / processes, FLOOR_MACS)`` (``inf`` without a cap).
        run_macs: the run's count (:func:`run_macs`).
        reason: one sentence for the summary.
        components: the count of each part at the choice, in training-step multiply-adds
            (weighted by ``WEIGHTS``): ``passes`` (forward + C backward),
            ``contraction`` (the Gram, the fallback's included), ``extras`` (J·w0, Adam's second
            moments), ``simulation`` (per step × simulated steps, stability report included).
        forward_macs: F, one sample's forward.
        lookahead: whether the fit-start look-ahead (:mod:`lightning_ttp.pipeline.lookahead`) fits the cap
            on top of the kernel and counts at most ``LOOKAHEAD_SHARE`` of the run: it is dropped
            before the kernel is shrunk (its count is the
            component ``lookahead``: k training steps, the kernel again at w_k, the continuation
            and its control).
        processes: the processes the kernel is split across (the counts are one process's).
        simulated_steps: the steps the ``simulation`` component counts (the run and its
            continuation).
        relinearisation_macs: one closed-loop call's kernel at w_k (passes, contraction, extras:
            on the subset's batch statistics when the model trains on them, for every optimiser;
            :func:`lightning_ttp.pipeline.run_state.relinearisation_steps` counts the calls with it).
    """

    num_samples: int
    kernel: str
    predicted_macs: float
    budget_macs: float
    run_macs: float
    reason: str
    components: dict[str, float] = field(default_factory=dict)
    forward_macs: float = 0.0
    processes: int = 1
    lookahead: bool = True
    simulated_steps: int = 0
    relinearisation_macs: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forward_macs(model: torch.nn.Module, inputs: Any, output_fn: Callable | None = None) -> float:
    """F: multiply-adds of one sample's forward, counted by ``FlopCounterMode`` (eval mode, no
    gradient; modes restored), at least the trainable parameter count."""
    n = min(PROBE_SAMPLES, sample_count(inputs))
    counter = FlopCounterMode(display=False)
    with preserve_modes(model), torch.no_grad(), counter:
        model.eval()
        model_outputs(model, take(inputs, n), output_fn)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return max(counter.get_total_flops() / 2 / n, float(trainable), 1.0)


def run_macs(plan: RunPlan, forward: float) -> float:
    """T · (B · 3F + ``STEP_OVERHEAD_MACS``): the planned run's count."""
    return plan.steps * (plan.effective_batch_size * 3.0 * forward + STEP_OVERHEAD_MACS)


def _simulation_macs(kind: str, n: int, c: int, plan: RunPlan, spec: OptimizerSpec, *, num_paths: int,
                     steps: int, groups: int) -> float:
    """The simulation's count on a kernel of ``n`` samples (see the module docstring, 4.)."""
    total = max(n, int(plan.dataset_size or n))
    batch = plan.effective_batch_size
    rows_c = c if kind == "full" else 1  # the trace kernel applies one (N, N) Gram per class
    if batch >= total:
        per_step = groups * (n * rows_c) ** 2 * (c // rows_c)
    else:
        kappa = (total - batch) / max(total - 1, 1)
        drawn = min(n, math.ceil(batch / max(kappa, 1e-12)))
        per_step = num_paths * groups * drawn * c * n * rows_c
    if spec.kind in ("adam", "adamw"):
        per_step *= 2  # the preconditioned blocks and the moments
    stability = LANCZOS_PRODUCTS * groups * (n * rows_c) ** 2 * (c // rows_c)
    return steps * (per_step + SIM_STEP_OVERHEAD_MACS) + stability


def prediction_macs(kind: str, n: int, *, contraction: float, forward: float, c: int, plan: RunPlan,
                    spec: OptimizerSpec, num_paths: int, steps: int, processes: int = 1) -> dict[str, float]:
    """Each part's count for the prediction on a ``kind`` kernel of ``n`` samples, given the
    contraction count the engine reported for that kind and size, in training-step multiply-adds
    (each kind of work weighted by ``WEIGHTS``); per process when the kernel's passes and
    contractions are split across ``processes``."""
    groups = spec.num_groups
    extras = (groups * n * 3.0 * forward if spec.has_weight_decay else 0.0)
    if spec.kind in ("adam", "adamw"):
        extras += min(8, max(1, n // plan.effective_batch_size)) * plan.effective_batch_size * 3.0 * forward
    counts = {"passes": n * (1 + 2 * c) * forward / processes, "contraction": contraction / processes,
              "extras": extras,
              "simulation": _simulation_macs(kind, n, c, plan, spec, num_paths=num_paths, steps=steps, groups=groups)}
    return {part: WEIGHTS[part] * macs for part, macs in counts.items()}


def batch_statistics_macs(n: int, c: int, forward: float, parameters: int, processes: int = 1) -> dict[str, float]:
    """The passes and contraction of the kernel on the subset's batch statistics
    (:func:`lightning_ttp.pipeline.batch_statistics.batch_statistics_state`), weighted: one forward
    of the n-sample batch and one backward of it per output row (n·C rows, split across
    ``processes``), n·F·(1 + 2·n·C/processes); the Gram J Jᵀ of the dense Jacobian, (n·C)²·P."""
    return {"passes": WEIGHTS["batch_statistics"] * n * forward * (1 + 2 * n * c / processes),
            "contraction": WEIGHTS["contraction"] * (n * c) ** 2 * parameters / processes}


def _candidates(n_max: int) -> list[int]:
    """N_max, then ×¾ (multiples of 8) down to MIN_SAMPLES."""
    out = [n_max]
    while out[-1] > MIN_SAMPLES:
        out.append(max(MIN_SAMPLES, int(out[-1] * 0.75) // 8 * 8))
    return out


def choose_kernel(
    model: torch.nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    plan: RunPlan,
    *,
    budget: float | None,
    floor_macs: float = FLOOR_MACS,
    output_fn: Callable | None = None,
    num_paths: int = 8,
    continuation: float = 2.0,
    processes: int = 1,
    kernel: str = "full",
) -> KernelChoice:
    """The exact kernel on all of ``inputs`` unless the prediction counts more than ``budget`` ×
    the run and ``floor_macs``; else the largest subset (exact, or the trace kernel on more
    samples) that fits. Deterministic: counts only (module docstring). ``budget=None``: no cap,
    the ``kernel`` kind ("full", "trace" or "auto": the one the estimate will use) on all of ``inputs``
    with its counts (for the closed loop's counted budget; ``budget_macs`` is then ``inf``).

    ``inputs``/``targets`` hold the candidate subset (N_max samples, a seeded random draw); the
    chosen N are its first N samples, so the caller should pass them shuffled; ``output_fn``,
    ``num_paths`` and ``continuation`` are the prediction's (:func:`lightning_ttp.api.predict_run`).
    ``processes``: the data-parallel processes the kernel and the run are split across (one
    process's counts are compared, module docstring).
    """
    if budget is not None and not 0 < budget <= 1000:
        raise ValueError(f"budget must be a share of the run's cost in (0, 1000], e.g. 1.0; got {budget!r}")
    spec = OptimizerSpec.from_optimizer(optimizer)
    n_max = int(targets.shape[0])
    groups = [g for g in spec.params or [] if g]
    parameters = sum(p.numel() for g in groups for p in g)
    adam = spec.kind in ("adam", "adamw")
    forward = forward_macs(model, inputs, output_fn)
    run = run_macs(plan, forward)
    processes = max(1, int(processes))
    allowed = math.inf if budget is None else max(budget * run / processes, floor_macs)
    steps = max(plan.steps, round(continuation * plan.steps))
    counts: dict[str, Any] = {}

    def engine_count(kind: str):
        """The engine's count of a ``kind`` kernel on all N_max samples (counted once per kind)."""
        if kind not in counts:
            counts[kind] = count_ntk_macs(model, inputs, num_samples=n_max, output_fn=flat_output_fn(output_fn),
                                          kernel=kind, parameter_groups=groups)
        return counts[kind]

    def eval_mode_parts(kind: str, n: int) -> dict[str, float]:
        """The counts with the kernel in eval mode (per-sample passes, the engine's contraction)."""
        count = engine_count(kind)
        # the contraction is quadratic in N (rows × rows of the Gram)
        contraction = (count.contraction_macs + count.fallback_macs) * (n / n_max) ** 2
        return prediction_macs(kind, n, contraction=contraction, forward=forward, c=count.num_outputs, plan=plan,
                               spec=spec, num_paths=num_paths, steps=steps, processes=processes)

    def on_batch_statistics(kind: str, n: int) -> dict[str, float] | None:
        """The batch-statistics kernel's passes and contraction where the model trains on them."""
        c = engine_count(kind).num_outputs
        if not kernel_on_batch_statistics(model, n, c, parameters):
            return None
        return batch_statistics_macs(n, c, forward, parameters, processes)

    def parts(kind: str, n: int) -> dict[str, float]:
        """The fit-start prediction's counts: its kernel on batch statistics for SGD-type optimisers
        on a model that trains on them (as :func:`~lightning_ttp.pipeline.estimate.estimate_kernel`)."""
        components = eval_mode_parts(kind, n)
        batch = None if adam else on_batch_statistics(kind, n)
        return components if batch is None else {**components, **batch}

    def choice(kind: str, n: int, reason: str) -> KernelChoice:
        components = parts(kind, n)
        total = sum(components.values())
        in_eval_mode = eval_mode_parts(kind, n)
        loop_kernel = {**in_eval_mode, **(on_batch_statistics(kind, n) or {})}
        relinearisation = loop_kernel["passes"] + loop_kernel["contraction"] + loop_kernel["extras"]
        # the look-ahead: k training steps, the kernel (eval mode) once more at w_k, the continuation and its control
        k = lookahead_steps(plan.steps)
        ahead = (k * (min(n, plan.effective_batch_size) * 3.0 * forward + STEP_OVERHEAD_MACS) / processes
                 + in_eval_mode["passes"] + in_eval_mode["contraction"] + 2 * components["simulation"]) if k else 0.0
        # within the cap, and at most LOOKAHEAD_SHARE of the run unless the whole is under the floor
        look = bool(k) and (budget is None or total + ahead <= allowed and ahead <= max(
            LOOKAHEAD_SHARE * run / processes, floor_macs - total))
        if k and not look:
            reason += (f"; no look-ahead (it would count more than the cap, or than {LOOKAHEAD_SHARE:.0%} of the "
                       "run)")
        across = f" across {processes} processes" if processes > 1 else ""
        if budget is None:
            reason += across + f" (no cost cap: counted {total:.2g} multiply-adds against the run's {run:.2g})"
        else:
            share = (f"{budget:g} × one process's share of the run's {run:.2g}" if processes > 1 else
                     f"{budget:g} × the run's {run:.2g}")
            kernel_count = components["passes"] + components["contraction"] + components["extras"]
            reason += across + (f" (counted {total:.2g} multiply-adds: kernel {kernel_count:.2g}, simulation of "
                                f"up to {steps} steps {components['simulation']:.2g}; cap {allowed:.2g} = "
                                + (f"{share})" if allowed > floor_macs else f"the floor, more than {share})"))
        if look:
            total += ahead
            components["lookahead"] = ahead
        return KernelChoice(n, kind, total, allowed, run, reason, components, forward, processes, look, steps,
                            relinearisation)

    def largest_fitting(kind: str, above: int = 0) -> int | None:
        return next((n for n in _candidates(n_max) if n > above and sum(parts(kind, n).values()) <= allowed), None)

    if budget is None:
        if kernel == "auto":  # as estimate_kernel resolves it
            outputs = engine_count("trace").num_outputs  # the cheaper count
            kernel = "full" if n_max * outputs <= FULL_KERNEL_MAX else "trace"
        if kernel not in ("full", "trace"):
            raise ValueError(f"kernel must be 'full', 'trace' or 'auto', got {kernel!r}")
        return choice(kernel, n_max, f"{'exact' if kernel == 'full' else 'trace'} kernel on all {n_max} samples")
    full = largest_fitting("full")
    if full == n_max:
        return choice("full", n_max, f"exact kernel on all {n_max} samples")
    # More samples matter more than the outputs' coupling (benchmarks/budget.py --sweep): a trace
    # kernel on more samples than the exact one fits on is preferred.
    trace = largest_fitting("trace", above=full or 0)
    if trace is not None:
        return choice("trace", trace, f"trace kernel on {trace} samples, the exact one would cost more than the cap "
                      + (f"on more than {full} samples" if full else f"on any of {n_max} down to {MIN_SAMPLES}"))
    if full is not None:
        return choice("full", full, f"exact kernel on {full} of {n_max} samples (more would cost more than the cap)")
    n = _candidates(n_max)[-1]
    return choice("trace", n, f"trace kernel on {n} samples, over the cap: the prediction costs more than the cap "
                  "allows even so")
