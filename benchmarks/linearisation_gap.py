"""Where the defaults' error comes from: the simulator, or the network leaving its linearisation.

Run (from the repository root)::

    python benchmarks/linearisation_gap.py            # 10 cases, ~5 min on 2 shared cores
    python benchmarks/linearisation_gap.py --quick    # 4 cases
    python benchmarks/linearisation_gap.py --seed 2 --json /tmp/gap.json
    python benchmarks/linearisation_gap.py --arch conv1d --full-n   # + the kernel on all N, ~3 min
    python benchmarks/linearisation_gap.py --growth   # + the kernel's growth along a GD run, ~1 min more

For cases of ``benchmarks/defaults.py`` (same tasks, models, optimisers and data; nothing but
defaults passed to ``lightning_ttp.predict_training_time``) three curves are compared:

* **pred**: the prediction of ``predict_training_time(model, loader, optimizer, T)``, the
  defaults (kernel on N0 = 256 of the N samples, subset correction, look-ahead, ...);
* **lin**: the *exact* linearisation at w0 trained for real: f_lin(x; w) = f(x; w0) + J(x; w0)(w − w0)
  (``torch.func.jvp`` through the model in train mode, BatchNorm on each batch's statistics),
  trained by the same optimiser class and settings on the same batches in the same order as the
  real run, over all N samples. This is what the paper's method (eq. 2–4: the linearised model's
  dynamics in function space) predicts at best; pred − lin is the error of our estimate of it
  (the kernel subset, the simulator, the Monte Carlo batches, the look-ahead's correction);
* **real**: the network itself trained by ``defaults.plain_training`` (the user's loop);
* **predN** (only with ``--full-n``; not the defaults, on purpose, and minutes a case on the CNN):
  the same call with ``num_samples=N``, the kernel on every sample (the kernel kind the cost cap
  picks for it): predN − lin is the simulator's error alone, pred − predN the kernel subset's.

Scored on the batch losses of both runs (the real and lin curves smoothed with the default
window; ``defaults.py`` itself scores mini-batch runs against the training-set loss, which the
linearised model would need a JVP over all N samples a step for), relative error
|a − b| / max(b, 1), within 13 % (GD) / 20 % (mini-batch);
"n.c." when a curve is still falling at T. Also the final losses L_T. The summary gives the
share within for pred vs real, pred vs lin, predN vs lin and lin vs real: where pred ≈ lin and lin ≠ real, the
error is the network's feature learning, which no estimate of the linearised dynamics removes.
``--growth`` adds, for the full-batch GD all-layer cases, the kernel's growth along the loss
gradient during the real run, g_t = ‖J_tᵀ r_t‖² / ‖J_0ᵀ r_t‖² on all N samples (r_t = ∂L/∂f at
the outputs f_t; J_t the Jacobian at w_t; by autograd, independently of the package's kernel
code): how much faster the network's current kernel moves the loss down its gradient than the
fit-start kernel would from the same outputs (what the closed loop's ``extrapolate_drift="growth"``
measures on the kernel subset, ``closed_loop.drift.residual_growth``).
The JSON goes to ``benchmarks/results/linearisation_gap.json`` or ``--json PATH``. One thread.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad_and_value, jvp, vjp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402
import defaults as D  # noqa: E402

import lightning_ttp  # noqa: E402

#: (arch, layers, N, optimiser, lr fraction of lr* (AdamW: the lr), batch, steps): a slice of defaults.grid()
CASES = [
    ("cnn-bn", "all", 300, "GD", 0.3, 300, 200),
    ("cnn-bn", "all", 1200, "GD", 0.3, 1200, 200),
    ("cnn-bn", "all", 2000, "SGD", 0.3, 64, 300),
    ("cnn-bn", "all", 1200, "AdamW", 1e-3, 64, 300),
    ("cnn-bn", "head", 1200, "GD", 0.5, 1200, 200),
    ("conv1d", "all", 300, "GD", 0.3, 300, 200),
    ("conv1d", "all", 1200, "GD", 0.1, 1200, 200),
    ("conv1d", "all", 2000, "SGD", 0.3, 64, 300),
    ("conv1d", "all", 1200, "AdamW", 1e-3, 64, 300),
    ("conv1d", "head", 1200, "GD", 0.5, 1200, 200),
]
QUICK = (0, 2, 5, 9)


def case_of(spec: tuple, seed: int) -> D.Case:
    arch, layers, n, opt, lr, batch, steps = spec
    fraction, fixed = (None, lr) if opt == "AdamW" else (lr, 0.0)
    return D.resolved(D.Case(D.TASKS[arch], arch, layers, n, opt, fraction, batch, steps, fixed), seed)


def linearised_training(model: torch.nn.Module, case: D.Case, loader, steps: int) -> list[float]:
    """Per-step batch losses of the linearisation of ``model`` at its current weights, trained by
    ``case``'s optimiser on ``loader``'s batches (module docstring, "lin")."""
    model = copy.deepcopy(model).train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def net(w, x):  # the frozen parameters are the model's own; train-mode BatchNorm runs on buffer copies
        return D.outputs_at(model, w, x)

    holder = torch.nn.Module()
    holder.delta = torch.nn.ParameterList([torch.zeros_like(w) for w in trainable.values()])
    optimizer = D.make_optimizer(case, holder)

    def batch_loss(dw, x, y):
        f0, tangent = jvp(lambda w: net(w, x), (trainable,), (dw,))
        return F.cross_entropy(f0 + tangent, y)

    losses = []
    while len(losses) < steps:
        for x, y in loader:
            dw = {n: d.detach() for n, d in zip(trainable, holder.delta, strict=True)}
            g, value = grad_and_value(batch_loss)(dw, x, y)
            losses.append(float(value))
            for n, d in zip(trainable, holder.delta, strict=True):
                d.grad = g[n]
            optimizer.step()
            if len(losses) == steps:
                break
    return losses


def run_case(case: D.Case, seed: int, full_n: bool = False) -> dict:
    model = D.fine_tune_model(case, seed)
    start = time.perf_counter()
    prediction = lightning_ttp.predict_training_time(model, D.make_loader(case, seed),
                                                     D.make_optimizer(case, model), case.steps)
    cost = time.perf_counter() - start
    on_all = (lightning_ttp.predict_training_time(model, D.make_loader(case, seed), D.make_optimizer(case, model),
                                                  case.steps, num_samples=case.n) if full_n else None)
    trained = copy.deepcopy(model)
    loader = D.make_loader(case, seed)
    real = D.plain_training(trained, D.make_optimizer(case, trained), loader, case.steps).batch_losses
    lin = linearised_training(model, case, D.make_loader(case, seed), case.steps)
    window = D.smoothing_window(case, D.make_loader(case, seed))
    times = {"pred": D.predicted_times(prediction),
             "predN": D.predicted_times(on_all) if full_n else dict.fromkeys(D.EPS),
             "lin": D.real_times(lin, window),
             "real": D.real_times(real, window)}
    final = {"pred": float(prediction.loss[-1]), "predN": float(on_all.loss[-1]) if full_n else float("nan"),
             "lin": float(D.smooth_losses(np.asarray(lin), window)[-1]),
             "real": float(D.smooth_losses(np.asarray(real), window)[-1])}
    return {"case": asdict(case), "kind": case.kind, "seed": seed, "times": times,
            "final_loss": final, "predict_seconds": cost, "predN_kernel": on_all.diagnostics.kernel if full_n else "-",
            "pred_vs_real": D.score(times["pred"], times["real"], case.kind),
            "pred_vs_lin": D.score(times["pred"], times["lin"], case.kind),
            "predN_vs_lin": D.score(times["predN"], times["lin"], case.kind) if full_n else None,
            "lin_vs_real": D.score(times["lin"], times["real"], case.kind)}


GROWTH_FRACTIONS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


def growth_along_run(case: D.Case, seed: int) -> dict:
    """g_t (module docstring) at ``GROWTH_FRACTIONS`` of a full-batch GD run, and the loss there."""
    model = D.fine_tune_model(case, seed).train()
    x, y = D.make_loader(case, seed).dataset.tensors
    start = copy.deepcopy(model)
    w0 = {n: p.detach() for n, p in start.named_parameters() if p.requires_grad}

    def outputs_at_start(w):
        return D.outputs_at(start, w, x)

    optimizer = D.make_optimizer(case, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    at = {round(f * case.steps): f for f in GROWTH_FRACTIONS}
    out = {}
    for t in range(case.steps + 1):
        if t in at:
            f = model(x)
            loss = F.cross_entropy(f, y)
            r = torch.autograd.grad(loss, f, retain_graph=True)[0]
            now = sum(float((g ** 2).sum()) for g in torch.autograd.grad(f, trainable, r))
            _, pull = vjp(outputs_at_start, w0)
            then = sum(float((g ** 2).sum()) for g in pull(r)[0].values())
            out[str(at[t])] = {"step": t, "loss": float(loss), "growth": now / then}
        if t == case.steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {"case": asdict(case), "seed": seed, "at": out}


def print_growth(rows: list[dict]) -> None:
    print("\n== growth of the kernel along the loss gradient, g_t = |J_t^T r_t|^2 / |J_0^T r_t|^2, real GD runs ==")
    print("arch   N     T | " + "  ".join(f"{f:>5.0%}" for f in GROWTH_FRACTIONS) + " | loss at the same steps")
    for r in rows:
        c, at = r["case"], r["at"]
        print(f"{c['arch']:6} {c['n']:5} {c['steps']:4} | " + "  ".join(f"{v['growth']:5.2f}" for v in at.values())
              + " | " + " ".join(f"{v['loss']:.3f}" for v in at.values()))


def _t(v) -> str:
    return "nc" if v is None else str(v)


def print_table(rows: list[dict]) -> None:
    print("\n== T_ε of the prediction (defaults), the exact linearisation trained for real, the real network ==")
    names = "pred/predN/lin/real" if rows and rows[0]["predN_vs_lin"] is not None else "pred/lin/real"
    head = "arch   lay      N opt       T |" + "".join(f" ε={e:<4} {names}  |" for e in D.EPS)
    print(head + f" L_T {names} | pred s | predN kernel")
    for r in rows:
        c = r["case"]
        t = r["times"]
        shown = ("pred", "predN", "lin", "real") if r["predN_vs_lin"] is not None else ("pred", "lin", "real")
        cells = "".join(f" {'/'.join(f'{_t(t[k][e]):>3}' for k in shown)} "
                        + "".join("-" if r[key] is None else "y" if r[key][str(e)]["within"] else "n"
                                  for key in ("pred_vs_lin", "predN_vs_lin", "lin_vs_real")) + "  |"
                        for e in D.EPS)
        f = "/".join(f"{r['final_loss'][k]:.3f}" for k in shown)
        print(f"{c['arch']:6} {c['layers']:5} {c['n']:5} {c['opt']:8} {c['steps']:4} |{cells}"
              f" {f} | {r['predict_seconds']:6.1f} | {r['predN_kernel']}")
    print("(the letters after each ε: pred within lin's T_ε, predN within lin's, lin within real's)")


def share(rows: list[dict], key: str, keep=lambda r: True) -> float | None:
    """Share of the kept rows' (case, ε) pairs within the threshold for ``key`` (rows without it skipped)."""
    ok = [r[key][str(e)]["within"] for r in rows if r[key] is not None and keep(r) for e in D.EPS]
    return float(np.mean(ok)) if ok else None


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name, keep in (("all", lambda r: True), ("all_layers", lambda r: r["case"]["layers"] == "all"),
                       ("head", lambda r: r["case"]["layers"] == "head")):
        out[name] = {key: share(rows, key, keep)
                     for key in ("pred_vs_real", "pred_vs_lin", "predN_vs_lin", "lin_vs_real")}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} of the {len(CASES)} cases")
    parser.add_argument("--seed", type=int, default=1, help="fine-tuning seed, held out from pre-training's 0")
    parser.add_argument("--arch", choices=sorted(D.TASKS), default=None, help="only this architecture's cases")
    parser.add_argument("--full-n", action="store_true", help="also predict with the kernel on all N (predN)")
    parser.add_argument("--growth", action="store_true", help="also the kernel's growth along the GD runs")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    specs = [s for s in ([CASES[i] for i in QUICK] if args.quick else CASES) if args.arch in (None, s[0])]
    rows = []
    for spec in specs:
        rows.append(run_case(case_of(spec, args.seed), args.seed, args.full_n))
        print(f"  [{time.perf_counter() - start:5.0f} s] {spec}", flush=True)
    print_table(rows)
    summary = summarise(rows)
    print("\nshare of (case, ε) pairs within the threshold:")
    for name, s in summary.items():
        print(f"  {name:10}" + "".join(f"   {key.replace('_vs_', ' vs ')} {'-' if v is None else f'{v:.0%}'}"
                                       for key, v in s.items()))
    growth = [growth_along_run(case_of(s, args.seed), args.seed) for s in specs
              if args.growth and s[1] == "all" and s[3] == "GD"]
    if growth:
        print_growth(growth)
    summary["seconds"] = time.perf_counter() - start
    print(f"run time {summary['seconds']:.0f} s")
    out = {"summary": summary, "rows": rows, "seed": args.seed, "growth": growth}
    print(f"JSON: {_results.save('linearisation_gap', out, args.json)}")
    return summary


if __name__ == "__main__":
    main()
