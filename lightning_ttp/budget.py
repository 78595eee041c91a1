"""A cost budget for the prediction: keep it a small share of the run it predicts.

The exact kernel costs O(N·C) backward passes plus an O((N·C)²·P) contraction and the
simulation one product with an (N·C)² Gram per simulated step, so on a large model a
256-sample prediction can cost as much as a short fine-tune. Before computing, a *pilot*
measures what each part costs on this machine, and nothing is modelled from operation counts
(they missed the contraction by 3.5× and the simulation by far more, ``benchmarks/budget.py``):

1. the run: one training step (forward + backward of the training loss in train mode on a
   batch of the run's size, plus the optimiser's own ``step`` on a copy of the parameters),
   × ``steps``; data loading, logging and Lightning's own work are not timed, so the run is
   rather under- than over-estimated and the budget errs on the cheap side;
2. the kernel: :func:`~lightning_ttp.kernel.empirical_ntk` on a pilot of a few dozen samples,
   its parts scaled to N samples: the passes (forward + C backward, and the fallback's
   per-sample Jacobians) by N/Nₚ, the Gram contraction by (N/Nₚ)² (an upper bound: the
   contraction is quadratic in N, and small pilots carry per-call overheads); J·w0 (weight
   decay) and Adam's second moments are charged from the timed training step;
3. the simulation: the package's own :func:`~lightning_ttp.simulate.simulate` on a random PSD
   kernel of the candidate's size, for a few dozen steps, extrapolated per step to the
   ``continuation``·T steps that :func:`~lightning_ttp.simulate.simulate_plan` simulates at
   most (the continuation stops once the loss has settled: an upper bound), plus its fixed
   part (the stability report), so the estimate follows the simulators whatever their
   implementation (a linear probe's Gram K ⊗ I_C is given that structure: the SGD-type
   simulators exploit it);
4. the choice: the largest candidate subset (N_max, then ×¾ down to ``MIN_SAMPLES``; the
   simulator is timed on the smallest and the largest candidate whose kernel fits, and
   interpolated as a power of N in between) whose kernel and simulation fit ``budget`` × run
   cost (never less than ``floor_seconds``) minus what the pilot already spent, with the exact
   kernel, or else the trace kernel (Θ ≈ K ⊗ I_C: a C² smaller Gram) when that fits on more
   samples; if nothing fits, the trace kernel on ``MIN_SAMPLES`` with a note that the
   prediction will exceed its budget.

The choice, its predicted cost per component and the measured run step are reported
(:class:`KernelChoice`, kept in the prediction's diagnostics). It depends on the machine's
speed and load: pass ``budget=None`` for a choice that does not. A subset of N samples
estimates the spectrum with a relative sampling error of order 1/√N; the trace kernel's error
is measured per model in ``docs/kernel.md``. Pure torch: no Lightning.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ._modes import preserve_modes
from .data import take
from .dynamics import Loss, OptimizerSpec, get_loss, kronecker_factor
from .estimate import KernelEstimate, flat_output_fn, model_outputs
from .kernel import empirical_ntk
from .plan import RunPlan
from .simulate import Method, simulate

__all__ = ["FLOOR_SECONDS", "MIN_SAMPLES", "PILOT_SAMPLES", "KernelChoice", "choose_kernel", "time_optimizer_step",
           "time_simulation", "time_training_step"]

#: the smallest kernel subset the budget chooses (smaller subsets bias the simulation)
MIN_SAMPLES = 64
#: the budget never asks for less than this (1/10 of a 5 s fine-tune): below it the pilot and
#: the simulator's fixed costs are most of the prediction and no subset fits
FLOOR_SECONDS = 0.5
#: samples of the pilot kernel (its passes scale by N/16, its contraction by (N/16)²)
PILOT_SAMPLES = 16
#: simulated steps of the simulator's timing (after a call of a few steps with the stability report)
_TIMED_STEPS = 32


@dataclass
class KernelChoice:
    """What the budget chose, and why.

    Attributes:
        num_samples: kernel subset size N.
        kernel: "full" or "trace".
        predicted_seconds: the whole prediction's predicted cost at that choice (pilot included).
        budget_seconds: ``max(budget × run_seconds, floor)``.
        run_seconds: the predicted cost of the run (``steps`` × one timed training step).
        pilot_seconds: what the pilot itself cost (already spent when the choice is made).
        reason: one sentence for the summary.
        components: the predicted seconds of each part of the prediction at the choice:
            ``pilot``, ``passes`` (forward + C backward, fallback Jacobians), ``contraction``,
            ``extras`` (J·w0, Adam's second moments), ``simulation`` (per step × simulated
            steps), ``simulation_fixed`` (the stability report and set-up).
        step_seconds: the timed run step's parts: ``forward_backward`` and ``optimizer``.
    """

    num_samples: int
    kernel: str
    predicted_seconds: float
    budget_seconds: float
    run_seconds: float
    pilot_seconds: float
    reason: str
    components: dict[str, float] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any], repeats: int = 4) -> float:
    """Fastest wall-clock of ``repeats`` calls after one warm-up call (on a shared machine the
    others' load only adds time: the fastest call is the least disturbed)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def time_training_step(model: torch.nn.Module, inputs: Any, targets: torch.Tensor, loss: str | Loss | Callable,
                       batch_size: int, output_fn: Callable | None = None) -> float:
    """Seconds of one forward + backward of the mean training loss on ``batch_size`` samples.

    Timed on up to the available samples and scaled linearly; gradients go to
    ``torch.autograd.grad`` (no ``.grad`` is written) with the model in train mode as in
    training (modes and the RNG restored). The optimiser's step: :func:`time_optimizer_step`.
    """
    n = int(targets.shape[0])
    take_n = max(1, min(n, batch_size))
    x, y = take(inputs, take_n), targets[:take_n]
    params = [p for p in model.parameters() if p.requires_grad]
    loss_obj = get_loss(loss)

    def step() -> None:
        out = model_outputs(model, x, output_fn)
        value = loss_obj.value(out.double(), loss_obj.prepare_targets(y.to(out.device), out.shape[1]))
        torch.autograd.grad(value, params, allow_unused=True)

    with preserve_modes(model), _own_rng(params):
        model.train()
        seconds = _timed(step)
    return seconds * batch_size / take_n


def _own_rng(params: list[torch.Tensor]):
    """The pilot draws (dropout, random gradients) from forked generators: the CPU one and that of
    every CUDA device the parameters live on; the caller's streams are as they were."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def time_optimizer_step(optimizer: torch.optim.Optimizer) -> float:
    """Seconds of ``optimizer.zero_grad(); optimizer.step()`` timed on a copy.

    The copy is an optimiser of the same class and param-group settings on detached copies of
    the parameters with random gradients, so the model and the optimiser (its state included)
    are untouched. 0 when the class cannot be rebuilt that way (e.g. it needs a closure).
    """
    groups = []
    for group in optimizer.param_groups:
        params = [p.detach().clone().requires_grad_(True) for p in group["params"] if p.requires_grad]
        groups.append({**{k: copy.deepcopy(v) for k, v in group.items() if k != "params"}, "params": params})
    try:
        clone = type(optimizer)(groups)

        def step() -> None:
            for group in clone.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        p.grad = torch.randn_like(p) * 1e-3
            clone.step()

        with _own_rng([p for g in groups for p in g["params"]]):
            return _timed(step)
    except Exception:  # noqa: BLE001 - an optimiser we cannot copy costs what we cannot time
        return 0.0


def _synthetic_kernel(spec: OptimizerSpec, loss: Loss, targets: torch.Tensor, num_outputs: int, kernel: str,
                      dtype: torch.dtype, lr_max: float, kronecker: bool = False,
                      device: torch.device | str = "cpu") -> KernelEstimate:
    """A random PSD kernel of the real shapes (``kronecker``: K ⊗ I_C, as a linear probe's), scaled
    to a stable lr (the simulators' cost does not depend on the values, but diverging ones would
    end in inf/NaN arithmetic)."""
    n, c = int(targets.shape[0]), num_outputs
    kronecker = kronecker and kernel == "full" and c > 1
    size = n * c if kernel == "full" and not kronecker else n
    g = torch.Generator().manual_seed(0)
    groups = spec.num_groups
    grams = []
    for _ in range(groups):
        a = torch.randn(size, min(size, 64), generator=g, dtype=torch.float64)
        gram = a @ a.T * (n / (4 * size * max(lr_max, 1e-12) * groups))
        grams.append((torch.kron(gram, torch.eye(c, dtype=gram.dtype)) if kronecker else gram).to(device, dtype))
    f0 = 0.1 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = loss.prepare_targets(targets.detach().cpu(), c)
    adam = spec.kind in ("adam", "adamw")
    blocks = None
    if adam:
        blocks = {"grams": grams, "group": list(range(groups)), "sizes": [max(1, gs.num_params) for gs in spec.groups],
                  "rms": [1e-3] * groups}
    jw = [torch.zeros(n, c, dtype=torch.float64) for _ in range(groups)] if spec.has_weight_decay else None
    return KernelEstimate(f0, y, grams, kernel, loss, jw, adam, 0.0, {}, blocks)


def time_simulation(spec: OptimizerSpec, plan: RunPlan, targets: torch.Tensor, num_outputs: int, *,
                    kernel: str = "full", loss: str | Loss | Callable = "cross_entropy",
                    dtype: torch.dtype = torch.float32, method: str | Method = Method.AUTO, num_paths: int = 8,
                    seed: int = 0, steps: int = _TIMED_STEPS, kronecker: bool = False,
                    device: torch.device | str = "cpu") -> tuple[float, float]:
    """(fixed seconds, seconds per simulated step) of :func:`~lightning_ttp.simulate.simulate`
    for ``plan`` on a random kernel of ``len(targets)`` samples on ``device`` (where the real
    Grams will live: the model's) (``kronecker``: of a linear probe's structure K ⊗ I_C, which
    the SGD-type simulators exploit).

    One call of 4 steps pays the fixed part (the stability report, whose eigenvalue problems
    are then cached with the kernel); two more, of 4 and ``steps`` + 4 steps, give the per-step
    cost as their difference (without the per-call set-up); the fixed part is the first call
    less 4 per-step costs.
    """
    lrs = plan.lr_schedule
    lrs = np.concatenate([lrs, np.repeat(lrs[-1:], max(0, steps + 4 - lrs.shape[0]), axis=0)])
    ke = _synthetic_kernel(spec, get_loss(loss), targets, num_outputs, kernel, dtype, float(np.max(lrs)), kronecker,
                           device)
    seconds = []
    for k in (4, 4, steps + 4):
        start = time.perf_counter()
        with warnings.catch_warnings():  # about the random kernel: not the user's business
            warnings.simplefilter("ignore")
            simulate(ke, spec, k, plan.effective_batch_size, lr_schedule=lrs[:k], method=method, num_paths=num_paths,
                     seed=seed, dataset_size=plan.dataset_size, drop_last=plan.drop_last, shuffle=plan.shuffle)
        seconds.append(time.perf_counter() - start)
    per_step = (seconds[2] - seconds[1]) / steps
    if per_step <= 0:  # a disturbed timing: the longer call's mean
        per_step = seconds[2] / (steps + 4)
    return max(0.0, seconds[0] - 4 * per_step), per_step


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
    budget: float,
    floor_seconds: float = FLOOR_SECONDS,
    loss: str | Loss | Callable = "cross_entropy",
    output_fn: Callable | None = None,
    method: str | Method = Method.AUTO,
    num_paths: int = 8,
    seed: int = 0,
    continuation: float = 2.0,
) -> KernelChoice:
    """The largest kernel subset (exact kernel, then the trace kernel) whose whole prediction
    fits ``budget`` × the run's predicted cost, or ``floor_seconds`` when that is more.

    ``inputs``/``targets`` hold the candidate subset (N_max samples, already a seeded random
    draw); the chosen N are its first N samples, so the caller should pass them shuffled. The
    other arguments are those of the prediction (:func:`lightning_ttp.api.predict_run`): the
    simulator is timed as it will run. See the module docstring for what is timed and how.
    """
    if not 0 < budget <= 10:
        raise ValueError(f"budget must be a share of the run's cost in (0, 10], e.g. 0.05; got {budget!r}")
    started = time.perf_counter()
    spec = OptimizerSpec.from_optimizer(optimizer)
    n_max = int(targets.shape[0])
    batch = plan.effective_batch_size
    forward_backward = time_training_step(model, inputs, targets, loss, batch, output_fn)
    step = {"forward_backward": forward_backward, "optimizer": time_optimizer_step(optimizer)}
    run_seconds = plan.steps * sum(step.values())
    allowed = max(budget * run_seconds, floor_seconds)
    simulated = max(plan.steps, round(continuation * plan.steps))
    groups = [g for g in spec.params or [] if g]
    dtype, device = groups[0][0].dtype, groups[0][0].device  # the Grams keep the model's dtype and device
    per_sample = forward_backward / batch
    extras_per_sample = per_sample * (len(groups) if spec.has_weight_decay else 0)
    extras_fixed = forward_backward * min(8, max(1, n_max // batch)) if spec.kind in ("adam", "adamw") else 0.0

    pilots: dict[str, tuple[int, int, dict[str, float], bool]] = {}

    def pilot(kind: str) -> tuple[int, int, dict[str, float], bool]:
        """(samples, outputs C, the kernel's timed parts, whether every Gram is K ⊗ I_C)."""
        if kind not in pilots:
            n_p = min(n_max, PILOT_SAMPLES)
            ntk = empirical_ntk(model, take(inputs, n_p), output_fn=flat_output_fn(output_fn), kernel=kind,
                                parameter_groups=groups, seed=seed)
            c = int(ntk.outputs.shape[1])
            kronecker = all(kronecker_factor(g.detach().cpu(), n_p, c) is not None for g in ntk.grams)
            pilots[kind] = (n_p, c, ntk.timings, kronecker)
        return pilots[kind]

    def kernel_parts(kind: str, n: int) -> dict[str, float]:
        n_p, _, t, _ = pilot(kind)
        return {"passes": (t["passes"] + t["fallback"]) * n / n_p, "contraction": t["contraction"] * (n / n_p) ** 2,
                "extras": extras_per_sample * n + extras_fixed}

    timed_sims: dict[tuple[str, int], tuple[float, float]] = {}
    notes: list[str] = []

    def simulation_parts(kind: str, n: int) -> dict[str, float]:
        if (kind, n) not in timed_sims:
            try:
                _, c, _, kronecker = pilot(kind)
                timed_sims[kind, n] = time_simulation(spec, plan, targets[:n], c, kernel=kind, loss=loss, dtype=dtype,
                                                      method=method, num_paths=num_paths, seed=seed,
                                                      kronecker=kronecker, device=device)
            except Exception as err:  # noqa: BLE001 - the budget must not stop the prediction
                notes.append(f"the simulation could not be timed ({type(err).__name__}: {err}); it is not counted")
                timed_sims[kind, n] = (0.0, 0.0)
        fixed, per_step = timed_sims[kind, n]
        return {"simulation": per_step * simulated, "simulation_fixed": fixed}

    def fits(parts: dict[str, float]) -> bool:
        return time.perf_counter() - started + sum(parts.values()) <= allowed

    def choice(kind: str, n: int, parts: dict[str, float], reason: str) -> KernelChoice:
        pilot_seconds = time.perf_counter() - started
        components = {"pilot": pilot_seconds, **parts}
        total = sum(components.values())
        kernel_seconds = parts["passes"] + parts["contraction"] + parts["extras"]
        reason += (f" (predicted {total:.2g} s: pilot {pilot_seconds:.2g} s, kernel {kernel_seconds:.2g} s, "
                   f"simulation of up to {simulated} steps "
                   f"{parts['simulation'] + parts['simulation_fixed']:.2g} s; budget {allowed:.2g} s = "
                   + (f"{budget:.0%} of the run's predicted {run_seconds:.2g} s)" if allowed > floor_seconds else
                      f"the floor of {floor_seconds:g} s, more than {budget:.0%} of the run's predicted "
                      f"{run_seconds:.2g} s)"))
        if total > allowed and "over the budget" not in reason:
            notes.append(f"over the budget by {total - allowed:.2g} s: the pilot's timings of choices that did not "
                         "fit cost more than guessed")
        reason = "; ".join([reason, *notes])
        return KernelChoice(n, kind, total, allowed, run_seconds, pilot_seconds, reason, components, step)

    def interpolated(kind: str, n: int, small: int, large: int) -> dict[str, float]:
        # between two timed sizes, each part as a power of n (its exponent measured by the two)
        parts = {}
        for key, a, b in zip(("simulation_fixed", "simulation"), timed_sims[kind, small], timed_sims[kind, large],
                             strict=True):
            exponent = max(0.0, math.log(b / a) / math.log(large / small)) if a > 0 and b > 0 else 0.0
            parts[key] = max(a, b) if exponent == 0.0 else a * (n / small) ** exponent
        parts["simulation"] *= simulated
        return parts

    def largest_fitting(kind: str, above: int = 0) -> tuple[int, dict[str, float]] | None:
        # The kernel's cost is known for every candidate; the simulator is timed on the smallest
        # and on the largest candidate whose kernel fits, and interpolated in between: at most two
        # timings per kernel kind. The largest is timed only when that (guessed as the smallest's
        # timing × n/n_small) leaves the smallest's prediction within the budget.
        sizes = [n for n in _candidates(n_max) if n > above and fits(kernel_parts(kind, n))]
        if not sizes:
            return None
        small, large = sizes[-1], sizes[0]
        tick = time.perf_counter()
        best = (small, {**kernel_parts(kind, small), **simulation_parts(kind, small)})
        if not fits(best[1]):
            return None
        if large == small or not fits({**best[1], "timing": (time.perf_counter() - tick) * large / small}):
            return best
        top = {**kernel_parts(kind, large), **simulation_parts(kind, large)}
        if fits(top):
            return large, top
        for n in sizes[1:-1]:
            parts = {**kernel_parts(kind, n), **interpolated(kind, n, small, large)}
            if fits(parts):
                return n, parts
        return best

    full = largest_fitting("full")
    if full is not None and full[0] == n_max:
        return choice("full", *full, f"exact kernel on all {n_max} samples")
    # More samples matter more than the outputs' coupling (benchmarks/budget.py --sweep: at equal N the
    # trace kernel's ε-times are within 30 % of the exact one's, from 64 to 256 samples they
    # triple): a trace kernel on more samples than the exact one fits on is preferred.
    trace = largest_fitting("trace", above=full[0] if full else 0)
    if trace is not None:
        return choice("trace", *trace, f"trace kernel on {trace[0]} samples (the exact one fits on " +
                      (f"{full[0]} samples only)" if full else f"none of {n_max} down to {MIN_SAMPLES} samples)"))
    if full is not None:
        return choice("full", *full, f"exact kernel on {full[0]} of {n_max} samples")
    n = _candidates(n_max)[-1]
    parts = {**kernel_parts("trace", n), **simulation_parts("trace", n)}
    return choice("trace", n, parts, f"trace kernel on {n} samples, over the budget: the prediction will exceed "
                  "its budget")
