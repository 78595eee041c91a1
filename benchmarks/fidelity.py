"""Prediction fidelity: the live ε-training-time prediction against the real run (issue #10).

Tasks (``benchmarks/_fidelity_tasks.py``, generated data): a CNN with BatchNorm on 12×12
texture images and an MLP on tabular data, each pre-trained on a source task and fine-tuned
on a target task with a fresh head: N = 256 samples, mini-batches of 64 (4 steps per epoch,
shuffled), T = 300 optimiser steps, cross-entropy; all layers and head only; SGD, SGD with
momentum 0.9 and AdamW; several seeds (head init, training draw, kernel subset and batch
order); the pre-trained backbone is shared across seeds.

Per run (plain torch, no Lightning):

* real: the training loss on the whole training set at w_t before every step t (train mode:
  BatchNorm on the statistics of the whole set, running statistics untouched), as the paper
  measures it (``--real batch``: the mini-batch losses smoothed as the package does, width
  5 — their noise near a plateau is of the order of ε); its ε-times for ε ∈ {0.1, 0.01}.
  When the real ε-time is beyond 0.8·T the curve has not stayed on its final level for the
  last fifth of the run: the case is reported as "not converged within the run" and left
  out of the error statistics. The predictions see only the mini-batch losses.
* open loop: ``estimate_kernel`` + ``simulate`` at w0 on a kernel subset of 64 samples
  (Monte Carlo mini-batch paths), the fit-start answer. Runs whose prediction the stability
  diagnostic flags (ρ_max > 1) are marked.
* live at f ∈ {5, 10, 25, 50} % of T, from the same prefix of observed losses:
  ``relin`` — :class:`lightning_ttp.pipeline.closed_loop.ClosedLoop` updated at 2, 5, 10, 25, 50 %
  inside the training loop; ``refine`` — :func:`lightning_ttp.pipeline.refine.refine_curve` of the
  open-loop curve; ``exp`` — a + b·e^{−ct} and ``power`` — a + b(t+1)^{−c} fitted to the prefix
  (``scipy.optimize.curve_fit``). Every method's curve is the smoothed prefix up to k joined
  to its own continuation.

Relative error |T̂_ε − T_ε| / T_ε. Table: median and 90th percentile per method and fraction,
the paired bootstrap 95 % interval of median(relin) − median(power), the seed-to-seed spread
of the real ε-time (the noise floor), the cost of a closed-loop call in training steps.
JSON summary in ``benchmarks/results/fidelity[_quick].json``.

Seeds 0–2 are the *design set* (every setting of the closed loop was chosen on them, mostly
on ``--quick``), seeds 3–5 the *held-out set*; the tables are printed for each.

Run: ``python benchmarks/fidelity.py --quick`` (the 3 design seeds, one lr per optimiser,
about 2 min on 1 thread) or without ``--quick`` (6 seeds, two learning rates per optimiser).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import curve_fit
from scipy.stats import bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fidelity_tasks import pretrained_backbone, source_and_target, with_fresh_head  # noqa: E402

from lightning_ttp.api import estimate_kernel, simulate  # noqa: E402
from lightning_ttp.dynamics import OptimizerSpec, epsilon_training_time  # noqa: E402
from lightning_ttp.pipeline.closed_loop import ClosedLoop  # noqa: E402
from lightning_ttp.pipeline.refine import default_smoothing_window, refine_curve, smooth_losses  # noqa: E402

T, N, BATCH, SUBSET = 300, 256, 64, 64
EPS = (0.1, 0.01)
FRACTIONS = (0.05, 0.10, 0.25, 0.50)
LOOP_FRACTIONS = (0.02, 0.05, 0.10, 0.25, 0.50)
METHODS = ("relin", "refine", "exp", "power")
DESIGN_SEEDS = 3  # seeds 0..2: the design set (settings were tuned on them); seeds 3.. are held out
NOT_CONVERGED = 0.8  # real ε-time beyond this fraction of T: no plateau within the run, "not converged"
LRS = {  # per architecture and optimiser; the full preset adds a second lr (×0.5)
    "cnn": {"sgd": 0.3, "sgdm": 0.03, "adamw": 1e-2},
    "mlp": {"sgd": 0.2, "sgdm": 0.02, "adamw": 3e-3},
}


# ---------------------------------------------------------------------------- baselines
def _exp(t, a, b, c):
    return a + b * np.exp(-c * t)


def _power(t, a, b, c):
    return a + b * (t + 1.0) ** (-c)


def fitted_curve(kind: str, observed: np.ndarray) -> np.ndarray:
    """The prefix fit of ``kind`` ("exp" or "power") evaluated at steps 0..T−1 (constant if it fails)."""
    t = np.arange(observed.size, dtype=np.float64)
    lo = float(observed.min())
    fn, p0 = (_exp, (lo * 0.5, observed[0] - lo * 0.5, 3.0 / observed.size)) if kind == "exp" else \
        (_power, (lo * 0.5, observed[0], 0.5))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = curve_fit(fn, t, observed, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 10.0]),
                             maxfev=5000)
        return fn(np.arange(T, dtype=np.float64), *p)
    except (RuntimeError, ValueError):
        return np.full(T, observed[-5:].mean())


def joined(prefix_smoothed: np.ndarray, continuation: np.ndarray) -> np.ndarray:
    """Smoothed observed prefix 0..k−1, then the method's curve from k to T−1."""
    k = prefix_smoothed.size
    return np.concatenate([prefix_smoothed, np.asarray(continuation)[k:T]])


# ---------------------------------------------------------------------------- one run
def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr)


def full_data_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training loss on the whole training set at the current weights, in train mode (BatchNorm
    on the batch statistics of the whole set) without touching the running statistics."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))
    finally:
        for m, (momentum, tracked) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def run_case(body, arch, mode, opt_name, lr, seed, target, loop_options: dict | None = None,
             real: str = "full") -> dict:
    x_all, y_all = target
    rng = np.random.default_rng(seed)
    pick = torch.as_tensor(rng.choice(x_all.shape[0], N, replace=False))
    x, y = x_all[pick], y_all[pick]
    model = with_fresh_head(body, arch, seed)
    params = list(model.parameters()) if mode == "all" else list(model[1].parameters())
    if mode == "head":
        for p in model[0].parameters():
            p.requires_grad_(False)
    opt = make_optimizer(opt_name, params, lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Adam approximation and stability warnings are recorded below
        spec = OptimizerSpec.from_optimizer(opt)
        sub = torch.as_tensor(np.sort(rng.choice(N, SUBSET, replace=False)))
        tick = time.perf_counter()
        start = estimate_kernel(model, x[sub], y[sub], spec, batch_size=BATCH, seed=seed)
        open_loop = simulate(start, spec, T, BATCH, dataset_size=N, seed=seed)
        open_seconds = time.perf_counter() - tick
    loop = ClosedLoop(spec, x[sub], y[sub], T, start, fractions=LOOP_FRACTIONS, batch_size=BATCH,
                      dataset_size=N, seed=seed, **(loop_options or {}))
    gen = torch.Generator().manual_seed(seed)
    observed, full, live, calls, train_seconds = [], [], {}, [], 0.0
    model.train()
    t = 0
    while t < T:
        order = torch.randperm(N, generator=gen)
        for s in range(0, N, BATCH):
            if t == T:
                break
            if t in loop.steps:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pred = loop.update(model, opt, observed)
                live[t] = pred
                calls.append((pred.seconds, pred.kernel_seconds))
            idx = order[s : s + BATCH]
            if real == "full":
                full.append(full_data_loss(model, x, y))
            tick = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            train_seconds += time.perf_counter() - tick
            observed.append(loss.item())
            t += 1
    observed = np.asarray(observed)
    window = default_smoothing_window(N // BATCH, False)
    truth, truth_window = (np.asarray(full), 1) if real == "full" else (observed, window)
    out = {"arch": arch, "mode": mode, "opt": opt_name, "lr": lr, "seed": seed,
           "flagged": bool(open_loop.diagnostics.get("rho_max", 0.0) > 1.0),
           "real_loss": observed.tolist(), "real_full_loss": list(full), "open_loop_loss": open_loop.loss[:T].tolist(),
           "train_step_seconds": train_seconds / T, "open_loop_seconds": open_seconds,
           "call_seconds": [c[0] for c in calls], "call_kernel_seconds": [c[1] for c in calls],
           "eps": {}}
    curves = {}
    for f in FRACTIONS:
        k = int(round(f * T))
        prefix = smooth_losses(observed[:k], window)
        ref = refine_curve(open_loop.loss, observed[:k], band=open_loop.loss_band)
        curves[f] = {
            "relin": live[k].loss[:T],
            "refine": joined(prefix, ref.loss),
            "exp": joined(prefix, fitted_curve("exp", observed[:k])),
            "power": joined(prefix, fitted_curve("power", observed[:k])),
        }
        out.setdefault("final_loss", {})[str(f)] = {m: float(c[-1]) for m, c in curves[f].items()}
        out.setdefault("drift", {})[str(f)] = {"scale": live[k].drift.scale, "alignment": live[k].drift.alignment,
                                               "alignment_start": live[k].drift.alignment_start}
    out["live_curves"] = {str(f): {m: np.asarray(c, dtype=np.float32).tolist() for m, c in curves[f].items()}
                          for f in FRACTIONS}
    out["real_final_loss"] = float(smooth_losses(truth, truth_window)[-1])
    for eps in EPS:
        real = epsilon_training_time(truth, eps, window=truth_window)
        rec = {"real": real, "converged": real is not None and real <= NOT_CONVERGED * T,
               "open_loop": epsilon_training_time(open_loop.loss[:T], eps), "live": {}}
        for f in FRACTIONS:
            rec["live"][str(f)] = {m: epsilon_training_time(c, eps) for m, c in curves[f].items()}
        out["eps"][str(eps)] = rec
    return out


# ---------------------------------------------------------------------------- summary
NO_ANSWER = 10.0  # relative error counted when a method's curve never converges (T_eps = None)


def rel_err(pred, real) -> float:
    return NO_ANSWER if pred is None else abs(pred - real) / max(real, 1)


def summarise(runs: list[dict]) -> dict:
    cases = [(r, str(e)) for r in runs for e in EPS]
    ok = [(r, e) for r, e in cases if r["eps"][e]["converged"]]
    summary = {"cases": len(cases), "not_converged": len(cases) - len(ok), "fractions": {}}

    def stats(errs):
        a = np.asarray(errs, dtype=np.float64)
        return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "n": int(a.size)}

    ol = [rel_err(r["eps"][e]["open_loop"], r["eps"][e]["real"]) for r, e in ok]
    summary["open_loop"] = stats(ol)
    unflagged_all = [rel_err(r["eps"][e]["open_loop"], r["eps"][e]["real"]) for r, e in ok
                     if r["mode"] == "all" and not r["flagged"]]
    summary["open_loop_all_layers_unflagged"] = stats(unflagged_all) if unflagged_all else None
    for f in FRACTIONS:
        errs = {m: [rel_err(r["eps"][e]["live"][str(f)][m], r["eps"][e]["real"]) for r, e in ok] for m in METHODS}
        row = {m: stats(v) for m, v in errs.items()}
        a, b = np.asarray(errs["relin"]), np.asarray(errs["power"])
        if len(a) > 2:
            ci = bootstrap((a, b), lambda u, v, axis: np.median(u, axis=axis) - np.median(v, axis=axis),
                           paired=True, n_resamples=2000, method="percentile", random_state=0).confidence_interval
            row["relin_minus_power"] = {"median_diff": float(np.median(a) - np.median(b)),
                                        "ci95": [float(ci.low), float(ci.high)]}
        flagged = [rel_err(r["eps"][e]["live"][str(f)]["relin"], r["eps"][e]["real"]) for r, e in ok if r["flagged"]]
        row["relin_flagged"] = stats(flagged) if flagged else None
        row["relin_unflagged"] = stats([rel_err(r["eps"][e]["live"][str(f)]["relin"], r["eps"][e]["real"])
                                        for r, e in ok if not r["flagged"]])
        fl = np.array([(np.log(max(r["final_loss"][str(f)]["relin"], 1e-12) / r["real_final_loss"]))
                       for r in runs])
        row["relin_final_loss_median_abs_log_ratio"] = float(np.median(np.abs(fl)))
        summary["fractions"][str(f)] = row
    # noise floor: spread of the real ε-time across seeds of one setting
    spread = []
    for key in {(r["arch"], r["mode"], r["opt"], r["lr"]) for r in runs}:
        for e in map(str, EPS):
            vals = [r["eps"][e]["real"] for r in runs if (r["arch"], r["mode"], r["opt"], r["lr"]) == key
                    and r["eps"][e]["converged"]]
            if len(vals) >= 2:
                med = np.median(vals)
                spread.extend(abs(v - med) / max(med, 1) for v in vals)
    summary["noise_floor_median_rel_spread"] = float(np.median(spread)) if spread else None
    step = np.median([r["train_step_seconds"] for r in runs])
    per_call = np.median([s for r in runs for s in r["call_seconds"]])
    summary["cost"] = {"train_step_seconds": float(step), "closed_loop_call_seconds": float(per_call),
                       "call_in_train_steps": float(per_call / step),
                       "closed_loop_share_of_training": float(np.median(
                           [sum(r["call_seconds"]) / (r["train_step_seconds"] * T) for r in runs])),
                       "kernel_share_of_call": float(np.median(
                           [k / s for r in runs for s, k in zip(r["call_seconds"], r["call_kernel_seconds"])]))}
    summary["flagged_runs"] = sum(r["flagged"] for r in runs)
    return summary


def print_table(summary: dict) -> None:
    print(f"cases (run x eps): {summary['cases']}, not converged within the run (real T_eps > "
          f"{NOT_CONVERGED:.0%} of T, excluded): {summary['not_converged']}; "
          f"runs flagged by the stability diagnostic: {summary['flagged_runs']}")
    o = summary["open_loop"]
    print(f"open loop: median {o['median']:.1%}  p90 {o['p90']:.1%}  (n={o['n']})", end="")
    u = summary["open_loop_all_layers_unflagged"]
    print("" if u is None else f"; all layers, unflagged: median {u['median']:.1%} (n={u['n']})")
    print("relative error of T_eps, median / p90")
    print("  at   | " + " | ".join(f"{m:>15}" for m in METHODS)
          + " | relin-power [95% CI]     | relin final loss |log ratio|")
    for f, row in summary["fractions"].items():
        cells = " | ".join(f"{row[m]['median']:6.1%} / {row[m]['p90']:6.1%}" for m in METHODS)
        d = row.get("relin_minus_power")
        diff = "" if d is None else f"{d['median_diff']:+6.1%} [{d['ci95'][0]:+6.1%}, {d['ci95'][1]:+6.1%}]"
        print(f"  {float(f):4.0%} | {cells} | {diff:24} | {row['relin_final_loss_median_abs_log_ratio']:.3f}")
    print("relin on runs the stability diagnostic flags / does not flag (median):  " + "  ".join(
        f"{float(f):.0%}: {'n/a' if row['relin_flagged'] is None else format(row['relin_flagged']['median'], '.1%')}"
        f" / {row['relin_unflagged']['median']:.1%}" for f, row in summary["fractions"].items()))
    nf = summary["noise_floor_median_rel_spread"]
    print(f"noise floor (median relative spread of the real T_eps across seeds): "
          f"{'n/a' if nf is None else f'{nf:.1%}'}")
    c = summary["cost"]
    print(f"cost: one closed-loop call = {c['closed_loop_call_seconds'] * 1e3:.0f} ms = "
          f"{c['call_in_train_steps']:.0f} training steps ({c['kernel_share_of_call']:.0%} kernel); "
          f"all calls = {c['closed_loop_share_of_training']:.0%} of the training time")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 3 design seeds, one lr per optimiser (< 10 min)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds 0..n-1; 0..{DESIGN_SEEDS - 1} are the design set")
    parser.add_argument("--archs", default="cnn,mlp")
    parser.add_argument("--opts", default="sgd,sgdm,adamw")
    parser.add_argument("--modes", default="all,head")
    parser.add_argument("--real", choices=("full", "batch"), default="full",
                        help="the real curve: the whole-training-set loss at every step (default) or the "
                             "smoothed mini-batch losses")
    parser.add_argument("--loop-options", default="{}",
                        help='JSON of relinearised_prediction options, e.g. {"extrapolate_drift": false}')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or (DESIGN_SEEDS if args.quick else 2 * DESIGN_SEEDS)
    lr_factors = (1.0,) if args.quick else (1.0, 0.5)
    started = time.perf_counter()
    runs = []
    for arch in args.archs.split(","):
        source, target = source_and_target(arch, 2000, 1024, seed=0)
        body = pretrained_backbone(arch, source)
        for mode in args.modes.split(","):
            for opt_name in args.opts.split(","):
                for factor in lr_factors:
                    for seed in range(seeds):
                        runs.append(run_case(body, arch, mode, opt_name, LRS[arch][opt_name] * factor, seed, target,
                                             json.loads(args.loop_options), args.real))
                        print(".", end="", flush=True)
    print(f" {len(runs)} runs in {time.perf_counter() - started:.0f} s")
    summary = {}
    for name, part in (("design", [r for r in runs if r["seed"] < DESIGN_SEEDS]),
                       ("held_out", [r for r in runs if r["seed"] >= DESIGN_SEEDS])):
        if part:
            print(f"--- {name} set: seeds {sorted({r['seed'] for r in part})}, {len(part)} runs")
            summary[name] = summarise(part)
            print_table(summary[name])
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    path = out / ("fidelity_quick.json" if args.quick else "fidelity.json")
    path.write_text(json.dumps({"summary": summary, "runs": runs,
                                "command": "python benchmarks/fidelity.py " + " ".join(argv or sys.argv[1:])}))
    print(f"JSON: {path}")
    return summary


if __name__ == "__main__":
    main()
