"""Training-time prediction accuracy: the paper's protocol (Section 5, Table 1), offline.

Protocol
--------
* Data: scikit-learn's ``load_digits`` (8×8 images, ships with the package). A backbone is
  pre-trained (Adam, full batch) on digits 0–4; the fine-tuning task is digits 5–9 with 30
  images per class (N = 150) and a freshly initialised 5-way head.
* Two backbones: ``mlp`` (64→128→64, tanh/ReLU) and ``cnn`` (two 3×3 convolutions + pooling).
* Grid, T = 150 optimiser steps, cross-entropy: full-batch GD and SGD (batch 10 and 30,
  reshuffled every epoch); momentum 0 / 0.9; all layers vs head only; learning rates set
  relative to the stability limit lr* of the linearised GD dynamics (``max_stable_lr`` of the
  prediction diagnostics): the *effective* lr η/(1−m) is ``frac × lr*`` with frac ∈ {0.1, 0.3}
  ("low": the paper's small-lr regime) and {1.0, 2.5} ("high"); ``--quick``: all layers only,
  batches 150/30, high {1.0}.
* Real: the fine-tuning itself; its loss on the whole training set is recorded at every
  step (outside the timed part). Smoothing before measuring T_ε: none for GD, a centred
  window of width 5 for SGD (``smooth_curve``: the moving average inside, a line at the ends).
* Predicted: ``lightning_ttp.api`` — one kernel per (backbone, trainable set), then per run
  ``simulate`` with method ``discrete`` (default for GD), ``mc`` (default for SGD, 8 paths),
  ``ode`` (ELR) and ``sde`` (8 paths).
* Score: for ε ∈ {1, 10, 40} % the ε-training-time T_ε of the real and predicted curves;
  a case is "within x %" if |T̂_ε − T_ε| ≤ max(x · T_ε, 1 step) (one step is the resolution).
  Cost ratio = (kernel + simulation seconds) / (seconds of the real fine-tuning steps);
  "amortised": the kernel's seconds shared by the runs that reuse it (what-if use). One
  throw-away prediction runs first so one-time costs (imports, set-up) are not timed.
* Cost vs model size: wide MLPs (width 128…2048, all layers, GD, 0.3·lr*) — training
  seconds / prediction seconds (kernel + lr* + simulation), and their T_ε.

Run: ``python benchmarks/tt_accuracy.py [--quick]``; the last line is a JSON summary.
Torch runs on one thread (the development machines are shared; both sides are timed alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ttp.api import estimate_kernel, simulate  # noqa: E402
from lightning_ttp.dynamics import OptimizerSpec, epsilon_training_time, smooth_curve  # noqa: E402

EPS = (0.01, 0.10, 0.40)
T = 150
TOL = {"GD": 0.13, "SGD": 0.20}


# ----------------------------------------------------------------------------- data / models
def fine_tuning_setups(pre, x, y, backbones, trainables):
    """Every (backbone, trainable) of the grid: the fine-tuning model (head-only freezes the
    backbone), a plain-SGD spec, its kernel estimate and the linearised stability limit lr*."""
    for bb in backbones:
        base = pretrained(bb, pre)
        for tr in trainables:
            model = copy.deepcopy(base)
            if tr == "head":
                for p in model[0].parameters():
                    p.requires_grad_(False)
            params = [p for p in model.parameters() if p.requires_grad]
            spec0 = OptimizerSpec.from_optimizer(torch.optim.SGD(params, lr=0.1))
            ke = estimate_kernel(model, x, y, spec0)
            lr_star = simulate(ke, spec0, 2).diagnostics["max_stable_lr"]
            yield bb, tr, model, spec0, ke, lr_star


def load_task(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    rng = np.random.default_rng(seed)
    pre = torch.as_tensor(np.nonzero(y.numpy() < 5)[0])
    fine = np.concatenate([rng.choice(np.nonzero(y.numpy() == c)[0], 30, replace=False) for c in range(5, 10)])
    fine = torch.as_tensor(rng.permutation(fine))
    return (x[pre], y[pre]), (x[fine], y[fine] - 5)


def backbone(name: str) -> torch.nn.Module:
    if name == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                   torch.nn.Linear(128, 64), torch.nn.ReLU())
    return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 64),
                               torch.nn.ReLU())


def pretrained(name: str, pre, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    body = backbone(name)
    model = torch.nn.Sequential(body, torch.nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = pre
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.manual_seed(seed + 1)
    return torch.nn.Sequential(body, torch.nn.Linear(64, 5))  # fresh head for the new task


# ----------------------------------------------------------------------------- real training
def real_run(model, params, x, y, *, lr, momentum, batch, seed, opt_name="sgd"):
    """Fine-tune; loss on all N at every step (untimed); returns (curve, seconds of the steps)."""
    n = x.shape[0]
    if opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve, spent, t = [], 0.0, 0
    while t < T:
        order = torch.randperm(n, generator=gen) if batch < n else torch.arange(n)
        for s in range(0, n, batch):
            if t == T:
                break
            with torch.no_grad():
                curve.append(F.cross_entropy(model(x), y).item())
            idx = order[s : s + batch]
            tick = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            spent += time.perf_counter() - tick
            t += 1
    with torch.no_grad():
        curve.append(F.cross_entropy(model(x), y).item())
    return np.array(curve), spent


# ----------------------------------------------------------------------------- benchmark
def tt(curve, eps, window=1):
    v = epsilon_training_time(smooth_curve(curve, window), eps)
    return v


def within(pred, real, tol):
    if pred is None or real is None:
        return pred is None and real is None
    return abs(pred - real) <= max(tol * real, 1.0)


def warm_up(x, y):
    """One throw-away prediction so one-time costs (imports, first-call set-up) are not timed."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    simulate(estimate_kernel(model, x[:10], y[:10], spec), spec, 3, 5)


def run(args):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    pre, (x, y) = load_task()
    warm_up(x, y)
    backbones = ["mlp", "cnn"]
    trainables = ["all", "head"]
    batches = [150, 30] if args.quick else [150, 30, 10]
    momenta = [0.0, 0.9]
    fracs = {"low": [0.1, 0.3], "high": [1.0] if args.quick else [1.0, 2.5]}
    fracs = {"low": args.low or fracs["low"], "high": args.high or fracs["high"]}
    if args.quick:
        trainables = ["all"]
    rows = []
    for bb, tr, model, spec0, ke, lr_star in fine_tuning_setups(pre, x, y, backbones, trainables):
        shared = len(momenta) * sum(len(v) for v in fracs.values()) * len(batches)
        for regime, fr in fracs.items():
            for frac in fr:
                for m in momenta:
                    lr = frac * lr_star * (1 - m)
                    for b in batches:
                        kind = "GD" if b >= x.shape[0] else "SGD"
                        work = copy.deepcopy(model)
                        wparams = [p for p in work.parameters() if p.requires_grad]
                        real, train_s = real_run(work, wparams, x, y, lr=lr, momentum=m, batch=b, seed=7)
                        spec = spec0.replace(lr=lr, momentum=m)
                        methods = ["discrete", "ode"] if kind == "GD" else ["mc", "sde", "ode", "discrete"]
                        window = 1 if kind == "GD" else 5
                        for meth in methods:
                            tick = time.perf_counter()
                            pred = simulate(ke, spec, T, b, method=meth, num_paths=8, seed=0)
                            sim_s = time.perf_counter() - tick
                            row = dict(backbone=bb, trainable=tr, regime=regime, frac=frac, momentum=m,
                                       batch=b, kind=kind, lr=lr, method=meth,
                                       default=(meth == ("discrete" if kind == "GD" else "mc")),
                                       rho=pred.diagnostics["rho_max"],
                                       cost_ratio=(ke.seconds + sim_s) / train_s,
                                       cost_ratio_amortised=(ke.seconds / shared + sim_s) / train_s,
                                       real_final=float(real[-1]), pred_final=float(pred.loss[-1]))
                            for e in EPS:
                                tr_, tp_ = tt(real, e, window), pred.training_time(e)
                                row[f"real_{e}"], row[f"pred_{e}"] = tr_, tp_
                                row[f"ok_{e}"] = within(tp_, tr_, TOL[kind])
                                row[f"ok10_{e}"] = within(tp_, tr_, 0.10 if kind == "GD" else 0.15)
                            rows.append(row)
                            if args.verbose:
                                print(json.dumps(row))
    if args.adam:
        rows += adam_rows(pre, x, y, args)
    return rows


def adam_rows(pre, x, y, args):
    """The Adam approximation on the mlp backbone, all layers (reported separately)."""
    out = []
    model = pretrained("mlp", pre)
    params = list(model.parameters())
    for lr in (1e-3, 3e-3):
        for b in (150, 30):
            kind = "GD" if b >= x.shape[0] else "SGD"
            opt = torch.optim.Adam(params, lr=lr)
            spec = OptimizerSpec.from_optimizer(opt)
            ke = estimate_kernel(model, x, y, spec, batch_size=b)
            work = copy.deepcopy(model)
            real, train_s = real_run(work, list(work.parameters()), x, y, lr=lr, momentum=0, batch=b, seed=7,
                                     opt_name="adam")
            pred = simulate(ke, spec, T, b, num_paths=8)
            row = dict(backbone="mlp", trainable="all", regime="adam", frac=None, momentum=0.9, batch=b, kind=kind,
                       lr=lr, method="adam-" + pred.diagnostics["method"], default=False,
                       rho=pred.diagnostics["rho_max"], cost_ratio=ke.seconds / train_s,
                       cost_ratio_amortised=ke.seconds / train_s,
                       real_final=float(real[-1]), pred_final=float(pred.loss[-1]))
            for e in EPS:
                tr_, tp_ = tt(real, e, 1 if kind == "GD" else 5), pred.training_time(e)
                row[f"real_{e}"], row[f"pred_{e}"] = tr_, tp_
                row[f"ok_{e}"] = within(tp_, tr_, TOL[kind])
                row[f"ok10_{e}"] = within(tp_, tr_, 0.10 if kind == "GD" else 0.15)
            out.append(row)
            if args.verbose:
                print(json.dumps(row))
    return out


def cost_scaling(pre, x, y, widths):
    """Cost ratio vs model size: wide MLPs, all layers, full-batch GD at 0.3 × lr* (T = 150)."""
    out = []
    for w in widths:
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, w), torch.nn.Tanh(),
                                   torch.nn.Linear(w, w // 2), torch.nn.ReLU())
        model = torch.nn.Sequential(body, torch.nn.Linear(w // 2, 5))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model(pre[0]), pre[1]).backward()
            opt.step()
        torch.manual_seed(1)
        model = torch.nn.Sequential(body, torch.nn.Linear(w // 2, 5))
        params = list(model.parameters())
        tick = time.perf_counter()
        spec = OptimizerSpec.from_optimizer(torch.optim.SGD(params, lr=0.1))
        ke = estimate_kernel(model, x, y, spec)
        lr = 0.3 * simulate(ke, spec, 2).diagnostics["max_stable_lr"]
        pred = simulate(ke, spec.replace(lr=lr), T, x.shape[0])
        predict_s = time.perf_counter() - tick
        work = copy.deepcopy(model)
        real, train_s = real_run(work, list(work.parameters()), x, y, lr=lr, momentum=0.0, batch=x.shape[0], seed=7)
        row = {"width": w, "parameters": sum(p.numel() for p in params), "train_seconds": train_s,
               "predict_seconds": predict_s, "cheaper_by": train_s / predict_s}
        for e in EPS:
            row[f"real_{e}"], row[f"pred_{e}"] = tt(real, e), pred.training_time(e)
        out.append(row)
    print("\nCost vs model size (MLP, all layers, GD, T = 150): training seconds / prediction seconds")
    for r in out:
        tts = ", ".join(f"ε={int(e * 100)}%: {r[f'real_{e}']}→{r[f'pred_{e}']}" for e in EPS)
        print(f"width {r['width']:5d}  params {r['parameters']:8d}  train {r['train_seconds']:6.2f}s  "
              f"predict {r['predict_seconds']:5.2f}s  cheaper ×{r['cheaper_by']:5.1f}  T_ε real→pred {tts}")
    return out


def abs_err(r, e):
    if r[f"real_{e}"] is None or r[f"pred_{e}"] is None:
        return math.nan
    return abs(r[f"real_{e}"] - r[f"pred_{e}"])


def report(rows, seconds, scaling=None):
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["method"], r["regime"])].append(r)
    cols = " | ".join(f"ε={int(e * 100):>2}% err  ok" for e in EPS)
    head = f"{'opt':4} {'method':13} {'lr':5} {'runs':>4} | {cols} | within | cost"
    print("\nTraining-time error in steps (mean |T̂_ε − T_ε|, T = 150) and fraction within 13 % (GD) / 20 % (SGD)")
    print(head)
    print("-" * len(head))
    for key in sorted(groups):
        rs = groups[key]
        cells = []
        for e in EPS:
            err = np.nanmean([abs_err(r, e) for r in rs])
            ok = np.mean([r[f"ok_{e}"] for r in rs])
            cells.append(f"{err:9.1f} {ok:4.0%}")
        allok = np.mean([r[f"ok_{e}"] for r in rs for e in EPS])
        cost = np.median([r["cost_ratio"] for r in rs])
        line = f"{key[0]:4} {key[1]:13} {key[2]:5} {len(rs):4d} | " + " | ".join(cells)
        print(line + f" | {allok:5.0%} | {cost:.3f}")
    print("\nDefault methods (discrete for GD, mc for SGD) by effective lr / lr* (lr* = linearised stability limit):")
    fr_vals = sorted({r["frac"] for r in rows if r["frac"] is not None})
    by_frac = {}
    for fr in fr_vals:
        cells = []
        for kind in ("GD", "SGD"):
            rs = [r for r in rows if r["default"] and r["frac"] == fr and r["kind"] == kind]
            if rs:
                ok = float(np.mean([r[f"ok_{e}"] for r in rs for e in EPS]))
                by_frac[f"{kind}_{fr:g}"] = ok
                cells.append(f"{kind}: {ok:5.1%} within {int(TOL[kind] * 100)} % ({len(rs) * len(EPS)} cases)")
        print(f"  lr = {fr:4g} × lr*   " + "   ".join(cells))
    summary = {"within_by_lr_fraction": by_frac}
    for regime in ("low", "high"):
        for kind in ("GD", "SGD"):
            rs = [r for r in rows if r["default"] and r["regime"] == regime and r["kind"] == kind]
            if rs:
                summary[f"{regime}_{kind}_within"] = float(np.mean([r[f"ok_{e}"] for r in rs for e in EPS]))
                summary[f"{regime}_{kind}_within_strict"] = float(np.mean([r[f"ok10_{e}"] for r in rs for e in EPS]))
                summary[f"{regime}_{kind}_cases"] = len(rs) * len(EPS)
    for meth in ("discrete", "mc", "ode", "sde"):
        rs = [r for r in rows if r["method"] == meth and r["regime"] == "low"]
        if rs:
            summary[f"low_{meth}_within"] = float(np.mean([r[f"ok_{e}"] for r in rs for e in EPS]))
    defaults = [r for r in rows if r["default"]]
    for kind in ("GD", "SGD"):
        for key in ("cost_ratio", "cost_ratio_amortised"):
            vals = [r[key] for r in defaults if r["kind"] == kind]
            if vals:
                summary[f"{key}_median_{kind}"] = float(np.median(vals))
    for bb in ("mlp", "cnn"):
        vals = [r["cost_ratio"] for r in defaults if r["kind"] == "GD" and r["backbone"] == bb]
        if vals:
            summary[f"cost_ratio_median_GD_{bb}"] = float(np.median(vals))
    high = [r for r in defaults if r["regime"] == "high"]
    summary["high_rho_max"] = float(max((r["rho"] for r in high), default=0.0))
    summary["high_unstable_runs"] = int(sum(r["rho"] > 1 for r in high))
    summary["high_unstable_within"] = float(np.mean([r[f"ok_{e}"] for r in high if r["rho"] > 1 for e in EPS])) \
        if summary["high_unstable_runs"] else None
    adam = [r for r in rows if r["regime"] == "adam"]
    if adam:
        summary["adam_within"] = float(np.mean([r[f"ok_{e}"] for r in adam for e in EPS]))
        summary["adam_mean_abs_err_steps"] = float(np.nanmean([abs_err(r, e) for r in adam for e in EPS]))
    if scaling:
        summary["cost_scaling"] = [{k: r[k] for k in ("width", "parameters", "cheaper_by")} for r in scaling]
    summary["seconds"] = seconds
    print(json.dumps(summary))
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid (< 3 min)")
    ap.add_argument("--verbose", action="store_true", help="print every run as JSON")
    ap.add_argument("--no-adam", dest="adam", action="store_false", help="skip the Adam approximation runs")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the cost-vs-size runs")
    ap.add_argument("--low", type=float, nargs="+", default=None, help="low-regime lr fractions of lr*")
    ap.add_argument("--high", type=float, nargs="+", default=None, help="high-regime lr fractions of lr*")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    rows = run(args)
    scaling = None
    if args.scaling:
        pre, (x, y) = load_task()
        scaling = cost_scaling(pre, x, y, [128, 512] if args.quick else [128, 512, 1024, 2048])
    report(rows, time.perf_counter() - start, scaling)


if __name__ == "__main__":
    main()
