"""A cost budget for the prediction: keep it a small share of the run it predicts.

The exact kernel costs O(N·C) backward passes plus an O((N·C)²·P) contraction, so on a large
model a 256-sample kernel can cost as much as a short fine-tune. Before computing, we

1. time one forward + backward of the training loss on a batch of the run's size (the run's
   cost ≈ ``steps`` × that);
2. predict the kernel's cost with :func:`lightning_ttp.kernel.estimate_ntk_cost` (one forward
   and C backward passes timed on a few samples, the contraction's multiply-adds counted as the
   engine will do them), scaled to a subset of n samples as passes·n/N + contraction·(n/N)²;
   the simulation adds one (paths, N·C) × (N·C, N·C) product per simulated step;
3. choose the largest subset N ≤ ``num_samples`` (halving, down to ``MIN_SAMPLES``) whose
   predicted kernel time fits ``budget`` × run cost (or a 3 s floor); when
   even that does not fit, the trace kernel (Θ ≈ K ⊗ I_C, C times cheaper to contract) at
   ``MIN_SAMPLES``.

The choice is reported (:class:`KernelChoice`, kept in the prediction's diagnostics). It
depends on the machine's speed: pass ``budget=None`` for a choice that does not. A subset of
N samples estimates the spectrum with a relative sampling error of order 1/√N; the trace
kernel's error is measured per model in ``docs/kernel.md``. Pure torch: no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ._modes import preserve_modes
from .data import take
from .dynamics import Loss, get_loss
from .estimate import flat_output_fn, model_outputs
from .kernel.cost import estimate_ntk_cost

__all__ = ["FLOOR_SECONDS", "MIN_SAMPLES", "KernelChoice", "choose_kernel", "time_training_step"]

#: The smallest kernel subset the budget halves down to.
#: the smallest kernel subset the budget chooses (smaller subsets bias the simulation)
MIN_SAMPLES = 64
#: the budget never asks for less than this: a 3 s prediction is cheap whatever the run
FLOOR_SECONDS = 3.0


@dataclass
class KernelChoice:
    """What the budget chose, and why.

    Attributes:
        num_samples: kernel subset size N.
        kernel: "full" or "trace" ("auto" when no budget was applied).
        predicted_seconds: the kernel's predicted cost at that choice.
        budget_seconds: ``budget`` × the predicted run cost.
        run_seconds: the predicted cost of the run (steps × one timed training step).
        pilot_seconds: what the timing itself cost.
        reason: one sentence for the summary.
    """

    num_samples: int
    kernel: str
    predicted_seconds: float
    budget_seconds: float
    run_seconds: float
    pilot_seconds: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any], repeats: int = 2) -> float:
    """Median wall-clock of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_training_step(model: torch.nn.Module, inputs: Any, targets: torch.Tensor, loss: str | Loss | Callable,
                       batch_size: int, output_fn: Callable | None = None) -> float:
    """Seconds of one forward + backward of the mean training loss on ``batch_size`` samples.

    Timed on up to the available samples and scaled linearly; gradients go to
    ``torch.autograd.grad`` (no ``.grad`` is written) with the model in train mode as in
    training (modes restored). The optimiser step itself is not timed (it is cheap next to
    the backward pass for the models this matters for).
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

    with preserve_modes(model), torch.random.fork_rng(devices=[]):
        model.train()
        seconds = _timed(step)
    return seconds * batch_size / take_n


def choose_kernel(
    model: torch.nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    budget: float,
    simulated_steps: int | None = None,
    paths: int = 1,
    floor_seconds: float = FLOOR_SECONDS,
    loss: str | Loss | Callable = "cross_entropy",
    output_fn: Callable | None = None,
) -> KernelChoice:
    """The largest kernel subset (then the trace kernel) whose kernel and simulation
    (``simulated_steps`` steps of ``paths`` Monte Carlo paths) fit ``budget`` × the run,
    or ``floor_seconds`` when that is more (a 3 s prediction is cheap whatever the run).

    ``inputs``/``targets`` hold the candidate subset (N_max samples, already a seeded random
    draw); the chosen N are its first N samples, so the caller should pass them shuffled.
    """
    if not 0 < budget <= 10:
        raise ValueError(f"budget must be a share of the run's cost in (0, 10], e.g. 0.05; got {budget!r}")
    started = time.perf_counter()
    n_max = int(targets.shape[0])
    run_seconds = steps * time_training_step(model, inputs, targets, loss, batch_size, output_fn)
    allowed = max(budget * run_seconds, floor_seconds)
    cost = estimate_ntk_cost(model, inputs, num_samples=n_max, output_fn=flat_output_fn(output_fn))
    linear = cost.passes_seconds  # N forward + C backward passes
    quadratic = cost.contraction_seconds + cost.fallback_seconds  # the Gram contractions (~N²)
    # the simulation: one (paths, N·C) × (N·C, N·C) product per simulated step (memory-bound: timed)
    quadratic += (simulated_steps or steps) * _product_seconds(paths, n_max * cost.num_outputs)

    def predicted(n: int) -> float:
        return linear * n / n_max + quadratic * (n / n_max) ** 2

    pilot = time.perf_counter() - started
    n = n_max
    while n > MIN_SAMPLES and predicted(n) > allowed:
        n = max(MIN_SAMPLES, n // 2)
    n = min(n, n_max)
    if predicted(n) <= allowed:
        reason = (f"exact kernel on {n} samples (predicted {predicted(n):.2g} s, budget {allowed:.2g} s = "
                  f"{budget:.0%} of the run's predicted {run_seconds:.2g} s)")
        if n < n_max:
            reason += f"; {n_max} samples would take {predicted(n_max):.2g} s"
        return KernelChoice(n, "full", predicted(n), allowed, run_seconds, pilot, reason)
    # even MIN_SAMPLES exceeds the budget: the trace kernel contracts C times less
    trace_seconds = linear * n / n_max + quadratic * (n / n_max) ** 2 / max(1, cost.num_outputs) ** 2
    reason = (f"trace kernel on {n} samples: the exact one would take {predicted(n):.2g} s, over the budget of "
              f"{allowed:.2g} s ({budget:.0%} of the run's predicted {run_seconds:.2g} s)")
    if trace_seconds > allowed:
        reason += f"; still predicted {trace_seconds:.2g} s: the prediction will exceed its budget"
    return KernelChoice(n, "trace", trace_seconds, allowed, run_seconds, pilot, reason)


def _product_seconds(paths: int, size: int, largest: int = 4096) -> float:
    """Seconds of one (paths, size) × (size, size) float32 product on the CPU, timed at up to
    ``largest`` and scaled by the matrix's size (the product reads the whole Gram)."""
    m = min(size, largest)
    gram, rows = torch.randn(m, m), torch.randn(max(1, paths), m)
    seconds = _timed(lambda: rows @ gram, repeats=3)
    return seconds * (size / m) ** 2

