"""The closed loop's drift model through the callback: the kernel held, its trace's trend, or its growth.

Run (from the repository root)::

    python benchmarks/live_drift.py                 # all-layer cases of defaults.py, seed 1, ~25 min
    python benchmarks/live_drift.py --seeds 1 2 --variants off growth
    python benchmarks/live_drift.py --quick         # defaults.py's --quick cases

An ablation, so *not* the defaults alone: ``TrainingTimePredictor()`` inside ``Trainer.fit``
exactly as ``benchmarks/defaults.py`` runs it (its all-layer cases, where the features learn),
once per drift model of the closed loop's re-linearisations
(``relinearised_prediction(extrapolate_drift=...)``, swapped in for the run; everything else the
defaults): ``off`` (the kernel held at Θ^{(k)}), ``scale`` (the trace scale's log trend) and
``growth`` (the default: the growth along the loss gradient continued on a log clock). Real
reference: the training-set loss of the callback's own run (``defaults.plain_training``, the same
data order; one run, not defaults.py's 3-order mean). Printed: the live error of T_ε at 10 / 25 /
50 % of the run per case, then the median and the share within 20 % over the (case, ε) pairs whose
real curve converged (a miss counts as +inf). JSON: ``benchmarks/results/live_drift.json`` or
``--json PATH``. One thread.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402
import defaults as D  # noqa: E402

import lightning_ttp.callbacks.predictor as predictor_module  # noqa: E402
from lightning_ttp.pipeline.closed_loop import ClosedLoop  # noqa: E402

VARIANTS = {"off": False, "scale": "scale", "growth": "growth"}


def run_case(case: D.Case, seed: int, root: str, variants: list[str]) -> dict:
    model = D.fine_tune_model(case, seed)
    run = D.plain_training(model, D.make_optimizer(case, model), D.make_loader(case, seed), case.steps)
    real = D.real_times(run.losses, 1)
    reference = {"eps": {str(e): {"real": real[e]} for e in D.EPS}, "batch_losses": run.batch_losses}
    row = {"case": asdict(case), "seed": seed, "real": {str(e): real[e] for e in D.EPS}}
    for name in variants:
        predictor_module.ClosedLoop = functools.partial(ClosedLoop, extrapolate_drift=VARIANTS[name])
        try:
            fit = D.callback_case(case, seed, root, reference)
        finally:
            predictor_module.ClosedLoop = ClosedLoop
        row[name] = {f: {e: s["error"] for e, s in v["live"].items()} for f, v in fit["live"].items()}
    return row


def summarise(rows: list[dict], variants: list[str]) -> dict:
    out = {}
    for name in variants:
        for f in map(str, D.FRACTIONS):
            errs = [np.inf if x is None else x for r in rows for e, x in r[name].get(f, {}).items()
                    if r["real"][e] is not None]
            out[f"{name}@{f}"] = {"median": float(np.median(errs)) if errs else None,
                                  "within_20": float(np.mean([x <= 0.2 for x in errs])) if errs else None,
                                  "pairs": len(errs)}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["off", "scale", "growth"])
    parser.add_argument("--quick", action="store_true", help="defaults.py's --quick cases")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    D.quiet_lightning()
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    cases = [c for c in D.grid(args.quick) if c.layers == "all"]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for case in (D.resolved(c, seed) for c in cases):
                rows.append(run_case(case, seed, root, args.variants))
                print(f"[{time.perf_counter() - start:5.0f} s] {D.case_text(rows[-1])} real "
                      + " ".join(D._t(v) for v in rows[-1]["real"].values()), flush=True)
                for name in args.variants:
                    cells = "  ".join(f"{float(f):.0%}: " + " ".join(D._err(x) for x in d.values())
                                      for f, d in rows[-1][name].items())
                    print(f"    {name:<7} {cells}", flush=True)
    summary = summarise(rows, args.variants)
    print("\n== live error of T_ε through the callback, pairs whose real curve converged ==")
    for key, s in summary.items():
        print(f"  {key:<12} median {D._err(s['median'])}, within 20 % {D._err(s['within_20'])} of {s['pairs']}")
    summary["seconds"] = time.perf_counter() - start
    print(f"run time {summary['seconds']:.0f} s")
    print(f"JSON: {_results.save('live_drift', {'summary': summary, 'rows': rows}, args.json)}")
    return summary


if __name__ == "__main__":
    main()
