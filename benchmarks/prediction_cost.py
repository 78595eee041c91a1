"""Cost of a whole prediction vs the kernel's cost and vs the training loop it predicts (CPU).

What is measured
----------------
* Task: scikit-learn's ``load_digits``. A CNN (two 3×3 convolutions, pooling, two Linear
  layers; 37 k parameters) is pre-trained on digits 0–4 (Adam, full batch, 150 steps); the
  fine-tuning task is digits 5–9, N = 256 images, a fresh 5-way head, all layers trained,
  batch 32 reshuffled every epoch, cross-entropy, T = 400 optimiser steps (``--quick``: 200).
* Optimisers: SGD with momentum 0.9 (lr 0.002, inside the linearised stability limit, about
  0.009 here) and AdamW (lr 1e-3, weight decay 0.01).
* Prediction, the two stages of ``predict_training_time`` (without its cost-budget pilots):
  ``lightning_ttp.pipeline.estimate.estimate_kernel`` on the N samples
  (the kernel's cost; for AdamW it includes the second moments and the preconditioned
  block Grams) + ``lightning_ttp.pipeline.simulate.simulate`` (Monte Carlo, 8 paths, plus the
  stability report). Each is
  timed ``--repeats`` times in this process; the medians are reported.
* Training loop: the real fine-tuning's optimiser steps (forward, backward, step), timed
  alone; the loss on all N samples after every step is recorded outside the timed part.
  Three seeds (``--quick``: two); the mean curve is the reference for the prediction's error.
* Error of a prediction: T_ε of the mean predicted curve vs T_ε of the mean real curve
  (smoothed over a centred window of width 5, ``smooth_curve``) for ε ∈ {0.1, 0.4}, and the largest
  gap between the two curves relative to the real drop L_0 − min L.
* Where the error comes from: the same optimiser (real ``torch.optim``, same loader seeds)
  training the *linearised* model f0 + J (w − w0) (J by ``torch.func.jacrev``). Prediction vs
  that curve is the function-space simulation's own error (Monte Carlo noise for SGD; for
  AdamW also the approximation of ``dynamics.adam``); linearised vs real is the linearisation's.
* AdamW block sweep: the same prediction with the Adam blocks (parameter tensors sharing one
  tracked second-moment drift, ``dynamics.adam``) capped at 1 (one per param group, the
  default), 4 and 16 (the former default; 8 here: one per tensor) — cost of the simulation and
  error against the same real runs.

Targets (issue #11): whole prediction ≤ 1.5× the kernel for SGD/momentum, ≤ 2.5× for AdamW.

Run: ``python benchmarks/prediction_cost.py [--quick]``; prints a table and a JSON summary
(also written to ``benchmarks/results/prediction_cost.json``). Torch uses two threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import save  # noqa: E402
from tt_accuracy import pretrained  # noqa: E402

import lightning_ttp.pipeline.estimate as estimate  # noqa: E402
from lightning_ttp.dynamics import OptimizerSpec, epsilon_training_time  # noqa: E402
from lightning_ttp.pipeline.simulate import simulate  # noqa: E402

N, BATCH, C = 256, 32, 5
EPS = (0.1, 0.4)
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)


def load_task():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    pre = y < 5
    fine = torch.nonzero(~pre)[:, 0][torch.randperm(int((~pre).sum()), generator=torch.Generator().manual_seed(0))]
    return (x[pre], y[pre]), (x[fine[:N]], y[fine[:N]] - 5)


def make_optimizer(name: str, params):
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.002, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def train(model, x, y, opt_name: str, steps: int, seed: int) -> tuple[np.ndarray, float]:
    """The real fine-tuning: (loss on all N after every step, seconds of the optimiser steps)."""
    model = copy.deepcopy(model)
    opt = make_optimizer(opt_name, model.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    curve, seconds = [], 0.0
    with torch.no_grad():
        curve.append(F.cross_entropy(model(x), y).item())
    while len(curve) <= steps:
        for xb, yb in loader:
            tick = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            seconds += time.perf_counter() - tick
            with torch.no_grad():
                curve.append(F.cross_entropy(model(x), y).item())
            if len(curve) > steps:
                break
    return np.array(curve), seconds


def train_linearised(model, x, y, opt_name: str, steps: int, seed: int) -> np.ndarray:
    """The real optimiser on the linearised model f0 + J (w − w0), batches as in :func:`train`."""
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    jm = torch.cat([j.reshape(x.shape[0] * C, -1) for j in jac.values()], 1)
    w0 = torch.cat([p.reshape(-1) for p in params.values()])
    f0 = functional_call(model, params, (x,)).detach()
    w = torch.nn.Parameter(w0.clone())
    opt = make_optimizer(opt_name, [w])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(x.shape[0])), batch_size=BATCH,
                                         shuffle=True, generator=torch.Generator().manual_seed(seed))

    def outputs() -> torch.Tensor:
        return f0 + (jm @ (w - w0)).reshape(-1, C)

    with torch.no_grad():
        curve = [F.cross_entropy(outputs(), y).item()]
    while len(curve) <= steps:
        for (batch,) in loader:
            opt.zero_grad()
            F.cross_entropy(outputs()[batch], y[batch]).backward()
            opt.step()
            with torch.no_grad():
                curve.append(F.cross_entropy(outputs(), y).item())
            if len(curve) > steps:
                break
    return np.array(curve)


def predict(model, x, y, opt_name: str, steps: int, max_blocks: int | None = None):
    """(kernel seconds, simulation seconds, prediction, kernel estimate) of one prediction."""
    spec = OptimizerSpec.from_optimizer(make_optimizer(opt_name, model.parameters()))
    blocks = estimate._blocks
    if max_blocks is not None:
        estimate._blocks = lambda groups: blocks(groups, max_blocks=max_blocks)
    try:
        tick = time.perf_counter()
        ke = estimate.estimate_kernel(model, x, y, spec, batch_size=BATCH)
        kernel_s = time.perf_counter() - tick
    finally:
        estimate._blocks = blocks
    tick = time.perf_counter()
    pred = simulate(ke, spec, steps, BATCH, dataset_size=N, num_paths=8)
    return kernel_s, time.perf_counter() - tick, pred, ke


def errors(pred_curve: np.ndarray, real_curve: np.ndarray, linearised_curve: np.ndarray) -> dict:
    out = {}
    for e in EPS:
        tp, tr = epsilon_training_time(pred_curve, e), epsilon_training_time(real_curve, e, window=5)
        tl = epsilon_training_time(linearised_curve, e, window=5)
        out[f"T_{e}"] = {"pred": tp, "linearised": tl, "real": tr,
                         "rel_error": None if tp is None or tr is None else abs(tp - tr) / max(tr, 1),
                         "rel_error_vs_linearised": None if tp is None or tl is None else abs(tp - tl) / max(tl, 1)}
    drop = real_curve[0] - real_curve.min()
    out["max_gap_over_drop"] = float(np.abs(pred_curve - real_curve).max() / drop)
    return out


def median_run(model, x, y, opt_name, steps, repeats, max_blocks=None):
    runs = [predict(model, x, y, opt_name, steps, max_blocks) for _ in range(repeats)]
    kernel_s = statistics.median(r[0] for r in runs)
    sim_s = statistics.median(r[1] for r in runs)
    ratios = [(r[0] + r[1]) / r[0] for r in runs]
    return kernel_s, sim_s, statistics.median(ratios), runs[-1][2], runs[-1][3]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 steps, 2 repeats, no block sweep: < 3 min")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    steps = 200 if args.quick else 400
    seeds = QUICK_SEEDS if args.quick else SEEDS
    repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    pre, (x, y) = load_task()
    model = pretrained("cnn", pre)  # the CNN backbone of tt_accuracy, pre-trained on digits 0–4
    predict(model, x[:16], y[:16], "sgd_momentum", 5)  # warm-up: one-time costs are not timed
    predict(model, x[:16], y[:16], "adamw", 5)
    summary: dict = {"benchmark": "prediction_cost", "quick": args.quick, "steps": steps, "n": N, "batch": BATCH,
                     "repeats": repeats, "params": sum(p.numel() for p in model.parameters())}
    rows = []
    sweeps = {"sgd_momentum": [None], "adamw": [1] if args.quick else [1, 4, 16]}
    for opt_name, caps in sweeps.items():
        real = [train(model, x, y, opt_name, steps, seed) for seed in seeds]
        real_curve = np.mean([r[0] for r in real], axis=0)
        train_s = statistics.median(r[1] for r in real)
        linearised = np.mean([train_linearised(model, x, y, opt_name, steps, seed) for seed in seeds], axis=0)
        for cap in caps:
            kernel_s, sim_s, ratio, pred, ke = median_run(model, x, y, opt_name, steps, repeats, cap)
            blocks = len(ke.adam_blocks["grams"]) if ke.adam_blocks else None
            row = {"optimizer": opt_name, "max_blocks": cap, "blocks": blocks,
                   "kernel_s": kernel_s, "simulate_s": sim_s, "prediction_over_kernel": ratio,
                   "training_s": train_s, "prediction_over_training": (kernel_s + sim_s) / train_s,
                   "method": pred.diagnostics["method"], **errors(pred.loss, real_curve, linearised)}
            rows.append(row)
    summary["rows"] = rows
    print(f"CNN fine-tune on digits: {summary['params']} parameters, N={N}, C={C}, batch {BATCH}, {steps} steps, "
          f"kernel on all N (full), 8 MC paths; medians of {repeats} repeats, training over {len(seeds)} seeds; "
          "T_ε predicted / real optimiser on the linearised model / real")
    head = (f"{'optimizer':<13} {'blocks':>6} {'kernel s':>9} {'simulate s':>10} {'pred/kernel':>11} "
            f"{'train s':>8} {'pred/train':>10} {'T0.1 p/lin/r':>13} {'T0.4 p/lin/r':>13} {'max gap':>8}")
    print(head)
    for r in rows:
        t1, t4 = r["T_0.1"], r["T_0.4"]
        print(f"{r['optimizer']:<13} {r['blocks'] or '-':>6} {r['kernel_s']:>9.2f} {r['simulate_s']:>10.2f} "
              f"{r['prediction_over_kernel']:>11.2f} {r['training_s']:>8.2f} {r['prediction_over_training']:>10.2f} "
              f"{'/'.join(str(t1[k]) for k in ('pred', 'linearised', 'real')):>13} "
              f"{'/'.join(str(t4[k]) for k in ('pred', 'linearised', 'real')):>13} "
              f"{r['max_gap_over_drop']:>8.2f}")
    save("prediction_cost", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
