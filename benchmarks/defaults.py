"""What a user gets with the DEFAULTS of the two public entry points.

Run (from the repository root)::

    python benchmarks/defaults.py            # full grid, ~10 min on 2 shared cores
    python benchmarks/defaults.py --quick    # a ~2-minute subset
    python benchmarks/defaults.py --long     # 1000-step runs only: the fit-start cost on long runs
    python benchmarks/defaults.py --seeds 1 2 --json /tmp/defaults.json

Nothing but defaults is passed to the entry points:

1. ``lightning_ttp.predict_training_time(model, loader, optimizer, steps)`` (loss
   "cross_entropy", N0 = 256, the cost cap `budget=1.0`, the look-ahead, method "auto", ...), then real training of a
   copy of the same model with the same optimiser settings: a plain torch loop over the same
   DataLoader for the same steps in ``model.train()``, recording the loss of each step's batch
   (what the callback observes).
2. ``TrainingTimePredictor()`` inside ``Trainer.fit`` (``max_steps=T``, no logger, bar,
   checkpointing or model summary; ``default_root_dir`` a temporary folder so that the plot
   the callback saves by default lands there). A probe callback placed after it reads the
   live estimate ``predictor.converge_step(ε)`` at 10 / 25 / 50 % of the run.

Tasks (none of ``_fidelity_tasks.py`` or ``tt_accuracy.py``; pre-trained once, seed 0, then
fine-tuned with a fresh seeded head on held-out seeds ≥ 1):

* ``digits-oddeven`` / arch ``cnn-bn``: scikit-learn's ``load_digits`` (8×8). A CNN with
  BatchNorm (conv-BN-ReLU-pool, conv-BN-ReLU, global pool, linear-ReLU) is pre-trained on the
  even digits; the target task is the odd digits (5 classes), the pool enlarged with copies
  shifted by one pixel plus noise so that N up to 2000 exists.
* ``waves-shape`` / arch ``conv1d``: generated 1-D signals (length 48). A 1-D conv net
  (conv-ReLU-pool, conv-ReLU, pool, linear-tanh) is pre-trained to tell the frequency band of
  a noisy sine (5 bands); the target task is the wave's shape (sine, square, triangle,
  sawtooth) at random frequency, phase and amplitude.

Layers: ``all`` (every parameter trainable) or ``head`` (backbone frozen by
``requires_grad_(False)``; the optimiser gets the head only). Optimisers: full-batch GD (SGD,
batch = N), SGD mini-batch with and without momentum 0.9, AdamW (torch defaults otherwise).

Scoring. T_ε of a curve L_0..L_T: the first step after which it stays within ε·(L_0 − L_T) of
L_T (``epsilon_training_time``). Predicted: ``Prediction.training_time(ε)``; "n.c." when
``not prediction.converged_within_run(ε)`` (still falling at T). Real: the loss on the whole
training set before each of the T steps (``training_set_loss``: train mode on copies of the
buffers, not timed; for full-batch GD that is the step's own loss), for a mini-batch run
averaged over ``ORDERS`` = 3 data orders of the same samples (``real_runs``): the expected
training loss, which is what the prediction estimates; "n.c." when ``still_falling``. One run's
curve is that plus the noise of its data order; the summary scores the predictions against it
too, and one run against the mean of the other orders (how close any estimate of the expected
curve can come to one run: the noise ceiling). The batch losses a mini-batch run reports add the
batch noise, and what is left of it after smoothing can exceed ε·(L_0 − L_T) at a small ε (then
their T_ε measures the noise): the predictions are scored against them as well
(``smooth_losses(batch losses, default_smoothing_window(steps per epoch, full batch))``, what the
callback reports). Relative error |pred − real| / max(real, 1) (the
package's own convention, a real T_ε of 0 steps counts as 1). "within": ≤ 13 % for GD,
≤ 20 % for mini-batch (the paper's thresholds); a pair where both sides are n.c. counts as
within, one side n.c. as a miss (error shown as "nc").

Columns of the tables:

* task, arch, layers, N, opt (GD | SGD | SGD+m0.9 | AdamW), lr, batch, T (optimiser steps),
  seed;
* ``ε=x pred/real err ok``: predicted and real T_ε, relative error, within the threshold (y/n);
* kernel: the prediction's diagnostics — kernel kind, samples used, and the budget's choice
  (``diagnostics.extra["budget"]``: samples/kernel it picked and the counts);
* cost: wall-clock of ``predict_training_time`` / of the plain training loop's steps;
* callback table: open-loop (fit-start) error and the live error at 10/25/50 % of the run
  ("live") next to the power law L(t) = a + b(t+1)^(−c) fitted to the same observed prefix
  ("pow", ``closed_loop.blend.power_law_curve``), for every ε; relin: whether the closed loop
  re-linearised (``state.live_step``); cost: ``predictor.cost_seconds`` / the fit's
  training-loop wall clock (``on_train_start`` → ``on_train_end``).

Then a summary: share of (case, ε) pairs within the threshold overall, for N ≥ 4·N0, for
all-layer cases and per ε (with how many pairs are "both n.c." and the share among the pairs
whose real curve converged); the median live and power-law errors at each fraction, over the
pairs whose real curve converged (a miss counts as +inf); the median cost ratios and the
prediction's wall clock over its budget's seconds (on runs of ≥ 1000 steps, ``--long``, the
callback's fit-start prediction and its closed loop's re-linearisations each over the fit's
training loop, which includes the re-linearisations; and against the training loop of the same
``Trainer.fit`` without the predictor, run once more per case: fit-start, closed loop and the
whole overhead, (fit-start + the fit's loop) / that loop − 1); whether the plain loop and ``Trainer.fit``
gave the same batch losses (same data order and start: the callback rows are scored against
the plain loop's real T_ε); and a determinism check
(``predict_training_time`` called twice on one case: are the predicted curves bit-identical?
the budget's timed choice of the kernel subset may differ between the calls). The JSON goes to
``benchmarks/results/defaults.json`` (``_results.save``) or ``--json PATH``. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402
from _fidelity_tasks import adam_pretrain  # noqa: E402

import lightning_ttp  # noqa: E402
from lightning_ttp.api import DEFAULT_NUM_SAMPLES  # noqa: E402
from lightning_ttp.dynamics.training_time import still_falling  # noqa: E402
from lightning_ttp.pipeline.closed_loop.blend import power_law_curve  # noqa: E402
from lightning_ttp.pipeline.refine import default_smoothing_window, epsilon_training_time, smooth_losses  # noqa: E402

EPS = (0.01, 0.1, 0.4)
TOL = {"GD": 0.13, "SGD": 0.20}
FRACTIONS = (0.10, 0.25, 0.50)
N0 = DEFAULT_NUM_SAMPLES
PRETRAIN_SEED = 0
#: data orders of a mini-batch run whose training-set losses are averaged into the real reference
ORDERS = 3


# ============================================================================ cases
@dataclass(frozen=True)
class Case:
    """One fine-tuning run; every field is printed with its row. ``lr_fraction`` (SGD-type runs):
    the lr as a fraction of the linearised stability limit lr* of plain GD at fit start (the
    paper's protocol; with momentum β the effective lr is lr/(1 − β)); ``lr`` is resolved from it
    per seed (:func:`resolved`), AdamW's is fixed."""

    task: str
    arch: str
    layers: str  # "all" | "head"
    n: int
    opt: str  # "GD" | "SGD" | "SGD+m0.9" | "AdamW"
    lr_fraction: float | None
    batch: int
    steps: int
    lr: float = 0.0

    @property
    def kind(self) -> str:
        """GD (full batch) or SGD (mini-batch), for the paper's threshold."""
        return "GD" if self.batch >= self.n else "SGD"

    @property
    def regime(self) -> str:
        """"low" lr (effective lr ≤ 0.5 lr*, and AdamW) or "high" (at lr* and above)."""
        if self.lr_fraction is None:
            return "low"
        effective = self.lr_fraction * (10.0 if self.opt == "SGD+m0.9" else 1.0)
        return "low" if effective <= 0.5 else "high"


TASKS = {"cnn-bn": "digits-oddeven", "conv1d": "waves-shape"}


#: ``--long``: runs of T = 1000 steps (issue #18: the fit-start prediction, look-ahead included,
#: within 10 % of the training loop on runs of at least 1000 steps)
LONG_SPECS = (("all", 1200, "GD", 0.1, 1200, 1000), ("all", 2000, "SGD", 0.3, 64, 1000),
              ("all", 1200, "AdamW", 1e-3, 64, 1000))


def grid(quick: bool, long: bool = False) -> list[Case]:
    """The benchmark's cases: (layers, N, optimiser, lr fraction of lr* (AdamW: the lr), batch, steps);
    ``long``: :data:`LONG_SPECS` only."""
    rows = []
    for arch in TASKS:
        if long:
            for layers, n, opt, lr, batch, steps in LONG_SPECS:
                fraction, fixed = (None, lr) if opt == "AdamW" else (lr, 0.0)
                rows.append(Case(TASKS[arch], arch, layers, n, opt, fraction, batch, steps, fixed))
            continue
        specs = [
            ("all", 300, "GD", 0.3, 300, 200),
            ("all", 1200, "GD", 0.1, 1200, 200),
            ("all", 1200, "GD", 0.3, 1200, 200),
            ("all", 2000, "SGD", 0.3, 64, 300),
            ("all", 1200, "SGD", 0.1, 64, 300),
            ("all", 300, "SGD+m0.9", 0.03, 32, 200),
            ("all", 2000, "SGD+m0.9", 0.01, 128, 300),
            ("all", 1200, "AdamW", 1e-3, 64, 300),
            ("head", 1200, "GD", 0.5, 1200, 200),
            ("head", 300, "SGD", 0.3, 32, 200),
            ("head", 2000, "AdamW", 3e-3, 128, 300),
            ("all", 1200, "GD", 1.0, 1200, 200),  # high lr: at the linearised stability limit
            ("all", 1200, "SGD", 1.0, 64, 300),
        ]
        if quick:
            specs = [specs[i] for i in (2, 3, 7, 9, 11)]
        elif arch == "cnn-bn":  # one longer run (~25 s of training): room for the closed loop to re-linearise
            specs.append(("all", 2000, "GD", 0.3, 2000, 600))
        for layers, n, opt, lr, batch, steps in specs:
            fraction, fixed = (None, lr) if opt == "AdamW" else (lr, 0.0)
            rows.append(Case(TASKS[arch], arch, layers, n, opt, fraction, batch, steps, fixed))
    return rows


@cache
def stability_limit(arch: str, layers: str, seed: int) -> float:
    """lr* of plain GD on the fine-tune model of ``seed`` at fit start: the prediction's
    ``max_stable_lr`` on the default kernel subset (a non-default call, only to set the lrs)."""
    model = fine_tune_model(Case(TASKS[arch], arch, layers, N0, "GD", 1.0, N0, 1), seed)
    (_, _), (x, y) = task_data(arch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pred = lightning_ttp.predict_training_time(model, (x[:N0], y[:N0]), opt, 2, num_paths=1, lookahead=False)
    return float(pred.diagnostics.max_stable_lr)


def resolved(case: Case, seed: int) -> Case:
    """The case with its lr for ``seed`` (``lr_fraction`` × lr*; AdamW's as given)."""
    if case.lr_fraction is None:
        return case
    return replace(case, lr=case.lr_fraction * stability_limit(case.arch, case.layers, seed))


# ============================================================================ data and models
def _digits_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(d.target)


def _shifted_copies(x: torch.Tensor, copies: int, rng: np.random.Generator) -> torch.Tensor:
    """``copies`` versions of every image, each rolled by one pixel in a random direction, plus noise."""
    out = []
    for _ in range(copies):
        moves = rng.integers(-1, 2, (x.shape[0], 2))
        rolled = torch.stack([torch.roll(img, tuple(int(m) for m in mv), dims=(1, 2)) for img, mv in zip(x, moves)])
        out.append(rolled + 0.05 * torch.from_numpy(rng.standard_normal(rolled.shape).astype(np.float32)))
    return torch.cat(out)


@cache
def digits_data():
    """(source: even digits, target pool: odd digits ×3 with shifted copies), labels 0..4."""
    x, y = _digits_images()
    even, odd = y % 2 == 0, y % 2 == 1
    rng = np.random.default_rng(1234)
    xo, yo = x[odd], y[odd] // 2
    pool_x = torch.cat([xo, _shifted_copies(xo, 2, rng)])
    return (x[even], y[even] // 2), (pool_x, yo.repeat(3))


def _wave(shape: int, freq: np.ndarray, phase: np.ndarray, length: int) -> np.ndarray:
    t = np.arange(length)[None] / length
    u = (freq[:, None] * t + phase[:, None]) % 1.0  # cycles, in [0, 1)
    if shape == 0:
        return np.sin(2 * np.pi * u)
    if shape == 1:
        return np.sign(np.sin(2 * np.pi * u))
    if shape == 2:
        return 4 * np.abs(u - 0.5) - 1
    return 2 * u - 1


@cache
def waves_data(length: int = 48, n_source: int = 3000, n_pool: int = 4000):
    """(source: frequency band of a noisy sine, 5 bands; target pool: wave shape, 4 classes)."""
    rng = np.random.default_rng(1234)
    band = rng.integers(0, 5, n_source)
    freq = 1.0 + 1.4 * band + rng.uniform(0, 1.2, n_source)
    xs = _wave(0, freq, rng.uniform(0, 1, n_source), length) + 0.3 * rng.standard_normal((n_source, length))
    shape = rng.integers(0, 4, n_pool)
    freq, phase = rng.uniform(1.5, 5.0, n_pool), rng.uniform(0, 1, n_pool)
    xt = np.stack([_wave(int(s), freq[i:i + 1], phase[i:i + 1], length)[0] for i, s in enumerate(shape)])
    xt = xt * rng.uniform(0.5, 1.5, (n_pool, 1)) + 0.3 * rng.standard_normal((n_pool, length))

    def tensor(a):
        return torch.tensor(a[:, None], dtype=torch.float32)

    return (tensor(xs), torch.tensor(band)), (tensor(xt), torch.tensor(shape))


def task_data(arch: str):
    return digits_data() if arch == "cnn-bn" else waves_data()


def backbone(arch: str) -> tuple[torch.nn.Module, int]:
    """(feature extractor, its width)."""
    if arch == "cnn-bn":
        body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU())
        return body, 32
    body = torch.nn.Sequential(
        torch.nn.Conv1d(1, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool1d(2),
        torch.nn.Conv1d(8, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(4),
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh())
    return body, 32


def num_classes(y: torch.Tensor) -> int:
    return int(y.max()) + 1


@cache
def pretrained_backbone(arch: str, steps: int = 300) -> torch.nn.Module:
    """The backbone after ``steps`` Adam steps (batch 128) on the source task (seed 0)."""
    (x, y), _ = task_data(arch)
    torch.manual_seed(PRETRAIN_SEED)
    body, width = backbone(arch)
    model = torch.nn.Sequential(body, torch.nn.Linear(width, num_classes(y)))
    adam_pretrain(model, x, y, steps=steps, seed=PRETRAIN_SEED)
    return body


def fine_tune_model(case: Case, seed: int) -> torch.nn.Module:
    """A copy of the pre-trained backbone with a fresh seeded head; head-only freezes the backbone."""
    _, (_, y) = task_data(case.arch)
    torch.manual_seed(seed)
    body = copy.deepcopy(pretrained_backbone(case.arch))
    model = torch.nn.Sequential(body, torch.nn.Linear(backbone(case.arch)[1], num_classes(y)))
    if case.layers == "head":
        body.requires_grad_(False)
    return model


def make_optimizer(case: Case, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if case.opt == "AdamW":
        return torch.optim.AdamW(params, lr=case.lr)
    return torch.optim.SGD(params, lr=case.lr, momentum=0.9 if case.opt == "SGD+m0.9" else 0.0)


def make_loader(case: Case, seed: int, order: int = 0) -> torch.utils.data.DataLoader:
    """N samples of the target pool drawn with ``seed``; shuffled every epoch unless full batch,
    from ``seed`` (``order`` 0) or another seed per ``order`` (the same samples in another order)."""
    _, (x, y) = task_data(case.arch)
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: case.n]
    data = torch.utils.data.TensorDataset(x[pick], y[pick])
    return torch.utils.data.DataLoader(data, batch_size=case.batch, shuffle=case.kind == "SGD",
                                       generator=torch.Generator().manual_seed(seed + 1000 * order))


# ============================================================================ scoring
def smoothing_window(case: Case, loader) -> int:
    return default_smoothing_window(len(loader), case.kind == "GD")


def real_times(losses, window: int) -> dict[float, int | None]:
    """Real T_ε of the observed per-step losses (smoothed); None: "n.c." (still falling at T)."""
    curve = smooth_losses(np.asarray(losses, dtype=np.float64), window)
    return {e: None if still_falling(curve, e) else epsilon_training_time(curve, e) for e in EPS}


def predicted_times(prediction) -> dict[float, int | None]:
    """Predicted T_ε; None: "n.c." (the predicted curve is still falling at T)."""
    return {e: prediction.training_time(e) if prediction.converged_within_run(e) else None for e in EPS}


def curve_times(curve) -> dict[float, int | None]:
    """T_ε of a whole estimated curve (live or power law), as the callback reports it."""
    return {e: epsilon_training_time(np.asarray(curve), e) for e in EPS}


def rel_error(pred: int | None, real: int | None) -> float | None:
    """|pred − real| / max(real, 1); 0 when both are n.c.; None (a miss) when one side is n.c."""
    if pred is None or real is None:
        return 0.0 if pred is None and real is None else None
    return abs(pred - real) / max(real, 1)


def score(pred: dict, real: dict, kind: str) -> dict[str, dict]:
    out = {}
    for e in EPS:
        err = rel_error(pred[e], real[e])
        out[str(e)] = {"pred": pred[e], "real": real[e], "error": err,
                       "within": err is not None and err <= TOL[kind]}
    return out


def diagnostics_summary(prediction) -> dict:
    d = prediction.diagnostics
    choice = d.extra.get("budget")
    return {"method": d.method, "kernel": d.kernel, "kernel_samples": d.kernel_samples,
            "budget": None if choice is None else {k: choice[k] for k in
                                                   ("num_samples", "kernel", "predicted_macs", "run_macs", "reason")},
            "lookahead": d.extra.get("lookahead"),
            "max_stable_lr": d.max_stable_lr, "warnings": list(d.warnings)}


# ============================================================================ entry point 1: predict_training_time
@dataclass
class RealRun:
    """The real run of one case: the loss of each step's batch (what the callback observes), the
    loss on the whole training set before each step (the scoring reference; the batch losses
    themselves for full-batch GD) and the seconds of the training steps alone."""

    batch_losses: list[float]
    losses: list[float]
    seconds: float


def outputs_at(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``params`` in place of those parameters, in the model's mode, on copies of
    its buffers: train-mode BatchNorm updates the copies, the model's running statistics stay."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return torch.func.functional_call(model, (params, buffers), (x,))


def training_set_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss on every training sample at the current weights, in train mode as the steps run
    (BatchNorm on the batch's statistics), on copies of the buffers: the running statistics and
    everything the next step sees are left as they were."""
    with torch.no_grad():
        return F.cross_entropy(outputs_at(model, dict(model.named_parameters()), x), y).item()


def plain_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, steps: int) -> RealRun:
    """The user's own loop: ``steps`` optimiser steps over ``loader`` in train mode; on
    mini-batches, the loss on the whole training set before each step as well (not timed)."""
    model.train()
    x_all, y_all = loader.dataset.tensors
    full_batch = loader.batch_size >= len(loader.dataset)
    batch_losses, losses, seconds = [], [], 0.0
    while len(batch_losses) < steps:
        for x, y in loader:
            if not full_batch:
                losses.append(training_set_loss(model, x_all, y_all))
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - start
            batch_losses.append(loss.item())
            if len(batch_losses) == steps:
                break
    return RealRun(batch_losses, losses if not full_batch else list(batch_losses), seconds)


def real_runs(case: Case, model: torch.nn.Module, seed: int) -> list[RealRun]:
    """The real runs of ``case`` from ``model``'s weights: one for full-batch GD (deterministic),
    ``ORDERS`` data orders of the same samples for a mini-batch run (the first is the order the
    callback's fit sees)."""
    runs = []
    for order in range(ORDERS if case.kind == "SGD" else 1):
        trained = copy.deepcopy(model)  # the copy that really trains, same weights and flags
        runs.append(plain_training(trained, make_optimizer(case, trained), make_loader(case, seed, order),
                                   case.steps))
    return runs


def expected_curve(runs: list[RealRun]) -> np.ndarray:
    """The training-set loss per step averaged over the runs' data orders."""
    return np.mean([r.losses for r in runs], axis=0)


def api_case(case: Case, seed: int) -> dict:
    model, loader = fine_tune_model(case, seed), make_loader(case, seed)
    start = time.perf_counter()
    prediction = lightning_ttp.predict_training_time(model, loader, make_optimizer(case, model), case.steps)
    cost = time.perf_counter() - start
    runs = real_runs(case, model, seed)
    predicted = predicted_times(prediction)
    real = real_times(expected_curve(runs), 1)
    this_run = real_times(runs[0].losses, 1)
    others = real_times(expected_curve(runs[1:]), 1) if len(runs) > 1 else this_run
    observed = real_times(runs[0].batch_losses, smoothing_window(case, loader))
    ahead = prediction.diagnostics.extra.get("lookahead")
    open_loop = ({e: ahead["open_loop_training_time"][str(e)] for e in EPS} if ahead else predicted)
    return {"case": asdict(case), "kind": case.kind, "regime": case.regime, "seed": seed,
            "eps": score(predicted, real, case.kind),
            "open": score(open_loop, real, case.kind),
            "vs_this_run": score(predicted, this_run, case.kind),
            "this_run_vs_others": score(this_run, others, case.kind),
            "vs_batch_losses": score(predicted, observed, case.kind),
            "diagnostics": diagnostics_summary(prediction), "batch_losses": runs[0].batch_losses,
            "predict_seconds": cost, "loop_seconds": runs[0].seconds, "cost_ratio": cost / runs[0].seconds}


# ============================================================================ entry point 2: the callback
def lightning_module(net: torch.nn.Module, case: Case):
    import lightning.pytorch as pl

    class FineTune(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return make_optimizer(case, self.net)

    return FineTune()


def probe_callback(predictor, steps: int, read: bool = True):
    """Reads ``predictor.converge_step(ε)`` at 10/25/50 % of the run (after the predictor's own
    hook at that step; not with ``read=False``) and times the training loop."""
    import lightning.pytorch as pl

    class Probe(pl.Callback):
        def __init__(self):
            self.at = {max(1, int(round(f * steps))): f for f in FRACTIONS}
            self.live: dict[float, dict] = {}
            self.loop_seconds = None

        def on_train_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            f = self.at.get(trainer.global_step) if read else None
            if f is not None and f not in self.live:
                self.live[f] = {"step": trainer.global_step,
                                "live": {e: predictor.converge_step(e) for e in EPS},
                                "prefix": list(predictor.observed_losses[: trainer.global_step])}

        def on_train_end(self, trainer, pl_module):
            self.loop_seconds = time.perf_counter() - self._start

    return Probe()


def fit_trainer(case: Case, root: str, callbacks: list):
    """The benchmark's ``Trainer``: ``max_steps=T`` on the CPU, no logger, bar, checkpointing or
    model summary, deterministic, in the temporary folder ``root``."""
    import lightning.pytorch as pl

    return pl.Trainer(max_steps=case.steps, accelerator="cpu", devices=1, callbacks=callbacks,
                      enable_progress_bar=False, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, deterministic=True, default_root_dir=root)


def fit_without_predictor(case: Case, seed: int, root: str) -> float:
    """Training-loop seconds of the same ``Trainer.fit`` without the predictor (the probe only)."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    module, loader = lightning_module(fine_tune_model(case, seed), case), make_loader(case, seed)
    probe = probe_callback(None, case.steps, read=False)
    fit_trainer(case, root, [probe]).fit(module, loader)
    return probe.loop_seconds


def callback_case(case: Case, seed: int, root: str, reference: dict, baseline: bool = False) -> dict:
    """The fit with the callback, scored against the plain loop's real T_ε (``reference``: the
    api row, the same data order and start; ``same_run`` says whether its batch losses agree);
    ``baseline``: also the training loop of the same fit without the predictor."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    module, loader = lightning_module(fine_tune_model(case, seed), case), make_loader(case, seed)
    predictor = lightning_ttp.TrainingTimePredictor()
    probe = probe_callback(predictor, case.steps)
    trainer = fit_trainer(case, root, [predictor, probe])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    real = {float(e): v["real"] for e, v in reference["eps"].items()}
    same_run = bool(np.allclose(predictor.observed_losses, reference["batch_losses"], rtol=1e-4, atol=1e-6))
    live = {}
    for f, seen in sorted(probe.live.items()):
        power = curve_times(power_law_curve(np.asarray(seen["prefix"]), case.steps + 1))
        live[str(f)] = {"step": seen["step"], "live": score(seen["live"], real, case.kind),
                        "power_law": score(power, real, case.kind)}
    open_loop = predicted_times(predictor.prediction) if predictor.prediction is not None else dict.fromkeys(EPS)
    return {"case": asdict(case), "kind": case.kind, "regime": case.regime, "seed": seed,
            "open_loop": score(open_loop, real, case.kind), "live": live, "same_run": same_run,
            "relinearised": predictor.state.live_step is not None, "live_step": predictor.state.live_step,
            "cost_seconds": predictor.cost_seconds, "loop_seconds": probe.loop_seconds,
            "cost_ratio": (predictor.cost_seconds or float("nan")) / probe.loop_seconds,
            "live_seconds": predictor.state.live_seconds,
            "baseline_loop_seconds": fit_without_predictor(case, seed, root) if baseline else None,
            "diagnostics": None if predictor.prediction is None else diagnostics_summary(predictor.prediction),
            "warnings": sorted({str(w.message)[:160] for w in caught if "lightning_ttp" in str(w.message)})}


# ============================================================================ determinism
def determinism_check(case: Case, seed: int) -> dict:
    """``predict_training_time`` twice on fresh copies of one case: bit-identical curves?"""
    curves = []
    for _ in range(2):
        model = fine_tune_model(case, seed)
        p = lightning_ttp.predict_training_time(model, make_loader(case, seed), make_optimizer(case, model),
                                                case.steps)
        curves.append((p.loss.tobytes(), diagnostics_summary(p)))
    (a, da), (b, db) = curves
    return {"case": asdict(case), "seed": seed, "bit_identical": a == b,
            "kernel_samples": [da["kernel_samples"], db["kernel_samples"]], "kernel": [da["kernel"], db["kernel"]]}


# ============================================================================ tables and summary
def _t(v) -> str:
    return "nc" if v is None else str(v)


def _err(v) -> str:
    return "nc" if v is None else f"{v:.0%}"


def case_text(row: dict) -> str:
    c = row["case"]
    return (f"{c['task']:<15}{c['arch']:<7}{c['layers']:<5}{c['n']:>5} {c['opt']:<9}{c['lr']:<7.3g}"
            f"{c['batch']:>5}{c['steps']:>5}{row['seed']:>3}")


CASE_HEAD = f"{'task':<15}{'arch':<7}{'lay':<5}{'N':>5} {'opt':<9}{'lr':<7}{'batch':>5}{'T':>5}{'sd':>3}"


def kernel_text(diag: dict | None) -> str:
    if diag is None:
        return "no prediction"
    b = diag["budget"]
    chose = "none" if b is None else f"{b['predicted_macs'] / b['run_macs']:.2f}× run"
    return f"{diag['kernel']}/{diag['kernel_samples']} (counted {chose})"


def print_api_table(rows: list[dict]) -> None:
    print("\n== predict_training_time (defaults) vs the plain torch loop ==")
    eps_head = "".join(f" | ε={e:<5g}pred/real err  ok" for e in EPS)
    print(CASE_HEAD + eps_head + f" | {'kernel kind/N0 (budget)':<32} | cost s pred/loop")
    for row in rows:
        cells = "".join(f" | {_t(s['pred']):>4}/{_t(s['real']):<4} {_err(s['error']):>5} "
                        f"{'y' if s['within'] else 'n':>3}" for s in row["eps"].values())
        print(f"{case_text(row)}{cells} | {kernel_text(row['diagnostics']):<32} | "
              f"{row['predict_seconds']:.1f}/{row['loop_seconds']:.1f}")


def print_callback_table(rows: list[dict]) -> None:
    print("\n== TrainingTimePredictor() in Trainer.fit: relative error of T_ε, open loop and live vs power law ==")
    print("   per ε: open | live/pow at 10 %, 25 %, 50 % of the run")
    for row in rows:
        print(f"{case_text(row)} relin {'y' if row['relinearised'] else 'n'} | "
              f"{kernel_text(row['diagnostics'])} | cost {row['cost_seconds'] or float('nan'):.1f}s / loop "
              f"{row['loop_seconds']:.1f}s")
        for e in map(str, EPS):
            live = "  ".join(f"{_err(v['live'][e]['error']):>5}/{_err(v['power_law'][e]['error']):<5}"
                             for v in row["live"].values())
            print(f"     ε={e:<5} open {_err(row['open_loop'][e]['error']):>5} | {live}")
        for w in row["warnings"]:
            print(f"     warning: {w}")


def share_within(rows: list[dict], key: str = "eps", keep=lambda r: True, eps=EPS) -> dict:
    """Share of (case, ε) pairs within the threshold; also how many of them are "both n.c." and
    the share among the pairs whose real curve converged within the run."""
    scores = [r[key][str(e)] for r in rows if keep(r) for e in eps]
    hits = [s["within"] for s in scores]
    real = [s["within"] for s in scores if s["real"] is not None]
    return {"pairs": len(hits), "within": float(np.mean(hits)) if hits else None,
            "both_nc": sum(s["real"] is None and s["pred"] is None for s in scores),
            "real_converged_pairs": len(real), "within_real_converged": float(np.mean(real)) if real else None}


def median_error(scores: list[dict]) -> float | None:
    """Median relative error over (case, ε) pairs; a miss (one side n.c.) counts as +inf."""
    errs = [np.inf if s["error"] is None else s["error"] for s in scores]
    return float(np.median(errs)) if errs else None


def summarise(api: list[dict], cb: list[dict], det: dict | None) -> dict:
    big, all_layers = (lambda r: r["case"]["n"] >= 4 * N0), (lambda r: r["case"]["layers"] == "all")
    low, high = (lambda r: r["regime"] == "low"), (lambda r: r["regime"] == "high")
    summary = {
        "n0": N0, "cases": len(api), "epsilons": list(EPS), "thresholds": TOL,
        "api_within": {"all": share_within(api), "n>=4n0": share_within(api, keep=big),
                       "all_layers": share_within(api, keep=all_layers),
                       "low_lr": share_within(api, keep=low), "high_lr": share_within(api, keep=high),
                       "low_lr_all_layers": share_within(api, keep=lambda r: low(r) and all_layers(r)),
                       "low_lr_n>=4n0": share_within(api, keep=lambda r: low(r) and big(r)),
                       **{f"eps={e:g}": share_within(api, eps=(e,)) for e in EPS}},
        "callback_open_loop_within": share_within(cb, "open_loop"),
        "live_median_error": {}, "median_cost_ratio": {
            "api": float(np.median([r["cost_ratio"] for r in api])) if api else None,
            "callback": float(np.nanmedian([r["cost_ratio"] for r in cb])) if cb else None},
        "callback_cost_ratio_1000_steps": [r["cost_ratio"] for r in cb if r["case"]["steps"] >= 1000],
        "closed_loop_cost_ratio_1000_steps": [r["live_seconds"] / r["loop_seconds"] for r in cb
                                              if r["case"]["steps"] >= 1000],
        # against the same fit without the predictor: what the user waits for in all
        "without_predictor_1000_steps": [
            {"fit_start": r["cost_seconds"] / r["baseline_loop_seconds"],
             "closed_loop": r["live_seconds"] / r["baseline_loop_seconds"],
             "whole": (r["cost_seconds"] + r["loop_seconds"]) / r["baseline_loop_seconds"] - 1.0}
            for r in cb if r["case"]["steps"] >= 1000 and r.get("baseline_loop_seconds")],
        "relinearised": sum(r["relinearised"] for r in cb), "determinism": det,
        "same_run": sum(r["same_run"] for r in cb),
        "api_within_sgd": share_within(api, keep=lambda r: r["kind"] == "SGD"),
        "api_within_sgd_vs": {key: share_within(api, key, lambda r: r["kind"] == "SGD")
                              for key in ("vs_this_run", "vs_batch_losses", "this_run_vs_others")},
        "api_open_loop_within": {"all": share_within(api, "open"), "all_layers": share_within(api, "open", all_layers),
                                 "low_lr": share_within(api, "open", low)},
        "median_error": {"with_lookahead": median_error([s for r in api for s in r["eps"].values()]),
                         "open_loop": median_error([s for r in api for s in r["open"].values()])},
        "median_lookahead_seconds": float(np.median([r["diagnostics"]["lookahead"]["seconds"] for r in api
                                                     if r["diagnostics"]["lookahead"]] or [0.0])),
    }
    for f in map(str, FRACTIONS):
        for source in ("live", "power_law"):
            scores = [s for r in cb if f in r["live"] for s in r["live"][f][source].values()
                      if s["real"] is not None]  # a real curve still falling at T: no T_ε to estimate
            summary["live_median_error"][f"{source}@{f}"] = median_error(scores)
            summary["live_median_error"][f"{source}_within@{f}"] = (float(np.mean([s["within"] for s in scores]))
                                                                    if scores else None)
    return summary


def print_summary(s: dict) -> None:
    def share(x):
        if x["within"] is None:
            return "n/a"
        conv = "n/a" if x["within_real_converged"] is None else f"{x['within_real_converged']:.0%}"
        return (f"{x['within']:.0%} of {x['pairs']} ({x['both_nc']} both n.c.; {conv} of the "
                f"{x['real_converged_pairs']} whose real curve converged)")

    print("\n== summary ((case, ε) pairs within 13 % GD / 20 % SGD) ==")
    print(f"predict_training_time: overall {share(s['api_within']['all'])}; N ≥ 4·N0={4 * N0}: "
          f"{share(s['api_within']['n>=4n0'])}; all layers: {share(s['api_within']['all_layers'])}")
    print("  per ε: " + "; ".join(f"ε={e:g} {share(s['api_within'][f'eps={e:g}'])}" for e in EPS))
    w = s["api_within"]
    print(f"  low lr (≤ 0.5 lr*, AdamW): {share(w['low_lr'])}; of them all layers: {share(w['low_lr_all_layers'])}; "
          f"N ≥ 4·N0: {share(w['low_lr_n>=4n0'])}; high lr (≥ lr*): {share(w['high_lr'])}")
    print(f"callback open loop (fit start): {share(s['callback_open_loop_within'])}; "
          f"re-linearised in {s['relinearised']} of {s['cases']} fits; the same batch losses in the plain "
          f"loop and Trainer.fit in {s['same_run']} of {s['cases']} cases")
    vs = s["api_within_sgd_vs"]
    print(f"mini-batch cases: {share(s['api_within_sgd'])} against the expected training-set loss ({ORDERS} data "
          f"orders); against one run's: {share(vs['vs_this_run'])}; against its smoothed batch losses (what the "
          f"callback sees): {share(vs['vs_batch_losses'])}; one run against the other orders' mean (the noise "
          f"ceiling): {share(vs['this_run_vs_others'])}")
    for f in map(str, FRACTIONS):
        m = s["live_median_error"]
        print(f"at {float(f):.0%} of the run (pairs whose real curve converged): median error "
              f"live {_err(m[f'live@{f}'])} "
              f"(within {m[f'live_within@{f}']:.0%}) vs power law {_err(m[f'power_law@{f}'])} "
              f"(within {m[f'power_law_within@{f}']:.0%})")
    c = s["median_cost_ratio"]
    print(f"median cost ratio (prediction / training loop): api {c['api']:.2f}, callback {c['callback']:.2f}")
    long = s["callback_cost_ratio_1000_steps"]
    if long:
        print(f"callback on runs of >= 1000 steps ({len(long)} fits): fit-start prediction / training loop "
              f"median {np.median(long):.3f}, max {max(long):.3f}; the closed loop's re-linearisations / training "
              f"loop median {np.median(s['closed_loop_cost_ratio_1000_steps']):.3f}")
    plain = s["without_predictor_1000_steps"]
    if plain:
        parts = {key: [p[key] for p in plain] for key in ("fit_start", "closed_loop", "whole")}
        print("  against the same Trainer.fit without the predictor (its training loop's seconds): "
              + ", ".join(f"{key.replace('_', ' ')} median {np.median(v):.2f} (max {max(v):.2f})"
                          for key, v in parts.items()))
    o, m = s["api_open_loop_within"], s["median_error"]
    print(f"the same predictions without the look-ahead (open loop): overall {share(o['all'])}; all layers: "
          f"{share(o['all_layers'])}; low lr: {share(o['low_lr'])};")
    print(f"  median error {_err(m['open_loop'])} -> {_err(m['with_lookahead'])} with it, "
          f"the look-ahead's median cost {s['median_lookahead_seconds']:.2f} s")
    if s["determinism"] is not None:
        d = s["determinism"]
        print(f"determinism: two predict_training_time calls bit-identical: {d['bit_identical']} "
              f"(kernel {d['kernel']}, samples {d['kernel_samples']})")


# ============================================================================ main
def quiet_lightning() -> None:
    """Lightning's and the callback's info messages off: both namespaces are imported first (the
    callbacks import every installed one, and each sets its loggers' levels on import)."""
    import lightning_ttp.callbacks  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~2-minute subset of the grid")
    parser.add_argument("--long", action="store_true", help="only the runs of 1000 steps (the fit-start cost)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="fine-tuning seeds, held out from the pre-training's 0 (default 1 2; --quick: 1)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of results/")
    parser.add_argument("--no-callback", action="store_true", help="skip the Trainer.fit runs")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([1] if args.quick else [1, 2])
    torch.set_num_threads(1)
    quiet_lightning()
    warnings.simplefilter("ignore")
    print(f"lightning_ttp from {lightning_ttp.__file__}")
    start = time.perf_counter()
    cases = grid(args.quick, args.long)
    for arch in TASKS:
        pretrained_backbone(arch)
    api, cb = [], []
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for case in (resolved(c, seed) for c in cases):
                api.append(api_case(case, seed))
                if not args.no_callback:
                    cb.append(callback_case(case, seed, root, api[-1], baseline=args.long))
                print(f"  [{time.perf_counter() - start:6.0f} s] {case_text(api[-1])}", flush=True)
    det = determinism_check(resolved(cases[0], args.seeds[0]), args.seeds[0])
    print_api_table(api)
    if cb:
        print_callback_table(cb)
    summary = summarise(api, cb, det)
    summary["seconds"] = time.perf_counter() - start
    summary["quick"], summary["long"], summary["seeds"] = args.quick, args.long, args.seeds
    print_summary(summary)
    print(f"run time {summary['seconds']:.0f} s")
    out = {"summary": summary, "api_rows": api, "callback_rows": cb}
    print(f"JSON: {_results.save('defaults', out, args.json)}")
    return summary


if __name__ == "__main__":
    main()
