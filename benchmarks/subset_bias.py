"""A kernel on N0 of N samples against the kernel on all N: how biased is the subset's curve?

Task: scikit-learn's digits; a tanh MLP (64-64-64) pre-trained on digits 0–4 (Adam, 200
full-batch steps), a fresh head, fine-tuned on the first N = 896 images of digits 5–9 by
full-batch GD (every layer), T = 300. The exact kernel is estimated once on all N samples;
a subset's kernel is its rows and columns (the same values), so the comparison isolates the
subset, not the kernel's estimate. For each N0 and seeded subset, three simulations with
``dataset_size=N`` (``lightning_ttp.simulate``, the package's discrete GD):

* ``full N``: the reference, the kernel on all N samples;
* ``subset``: the kernel on N0 samples as the package uses it (weights 1/N0);
* ``self-terms × N0/N``: the mean-field correction of each sample's own kernel block
  (``relinearise._self_terms_scaled``, the nearest PSD kernel of the result).

Prints T_ε (ε = 0.4, 0.1, 0.01) and the loss at steps 50 / 150 / 300 of each, the relative
ε-time error against the full-N curve, and writes ``benchmarks/results/subset_bias.json``.

    python benchmarks/subset_bias.py            # ~1 min on 2 CPU cores
    python benchmarks/subset_bias.py --lr 0.2   # another lr
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402

from lightning_ttp.dynamics import OptimizerSpec  # noqa: E402
from lightning_ttp.estimate import KernelEstimate, estimate_kernel  # noqa: E402
from lightning_ttp.relinearise import _self_terms_scaled  # noqa: E402
from lightning_ttp.simulate import simulate  # noqa: E402

EPS = (0.4, 0.1, 0.01)
N, C, STEPS = 896, 5, 300


def fine_tune_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh())
    model = torch.nn.Sequential(body, torch.nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    source = y < 5
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[source]), y[source]).backward()
        opt.step()
    model[1] = torch.nn.Linear(64, 5)
    target = y >= 5
    return model, x[target][:N], y[target][:N] - 5


def restricted(full: KernelEstimate, idx: torch.Tensor) -> KernelEstimate:
    """The kernel estimate of the samples ``idx``: the full kernel's rows and columns."""
    g = full.grams[0].reshape(N, C, N, C)[idx][:, :, idx].reshape(len(idx) * C, len(idx) * C)
    return KernelEstimate(full.outputs[idx], full.targets[idx], [g], "full", full.loss)


def summary_of(prediction) -> dict:
    return {"training_time": {str(e): prediction.training_time(e) for e in EPS},
            "loss": {str(t): float(prediction.loss[t]) for t in (50, 150, STEPS)}}


def errors(row: dict, reference: dict) -> dict:
    out = {}
    for e in map(str, EPS):
        p, r = row["training_time"][e], reference["training_time"][e]
        out[e] = None if p is None or not r else abs(p - r) / r
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--subsets", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, x, y = fine_tune_model()
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=args.lr))
    full = estimate_kernel(model, x, y, spec, kernel="full")
    reference = summary_of(simulate(full, spec, STEPS, None))
    rows = []
    head = "".join(f"{'T(ε=' + format(e, 'g') + ')':>9}" for e in EPS) + "".join(f"{'L_' + str(t):>8}"
                                                                                 for t in (50, 150, STEPS))
    print(f"full-batch GD, lr {args.lr}, N = {N}, T = {STEPS}; the full-N kernel's curve is the reference")
    print(f"{'kernel':<34}{head}   ε-time error vs full N")
    print(f"{'full N = ' + str(N):<34}" + "".join(f"{reference['training_time'][str(e)]!s:>9}" for e in EPS)
          + "".join(f"{reference['loss'][str(t)]:>8.4f}" for t in (50, 150, STEPS)))
    for n0 in args.subsets:
        for seed in range(args.seeds):
            idx = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:n0].sort().values
            ke = restricted(full, idx)
            corrected = copy.copy(ke)
            corrected.grams = [_self_terms_scaled(ke.grams[0], n0, n0 / N).to(ke.grams[0].dtype)]
            corrected.stability_cache = {}
            for name, kernel in (("subset", ke), ("self-terms × N0/N", corrected)):
                row = summary_of(simulate(kernel, spec, STEPS, None, dataset_size=N))
                row.update(n0=n0, seed=seed, kernel=name, error=errors(row, reference))
                rows.append(row)
                err = "  ".join("n/a" if v is None else f"{v:.0%}" for v in row["error"].values())
                print(f"{f'N0 = {n0}, seed {seed}, {name}':<34}"
                      + "".join(f"{row['training_time'][str(e)]!s:>9}" for e in EPS)
                      + "".join(f"{row['loss'][str(t)]:>8.4f}" for t in (50, 150, STEPS)) + f"   {err}")
    for name in ("subset", "self-terms × N0/N"):
        errs = [v for r in rows if r["kernel"] == name for v in r["error"].values() if v is not None]
        print(f"median ε-time error vs full N, {name}: {np.median(errs):.1%} (max {np.max(errs):.1%})")
    _results.save("subset_bias", {"lr": args.lr, "reference": reference, "rows": rows})


if __name__ == "__main__":
    main()
