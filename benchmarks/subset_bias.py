"""A kernel on N0 of N samples against the kernel on all N: how biased is the subset's curve?

Two tasks, each with the exact kernel estimated once on all N samples; a subset's kernel is its
rows and columns (the same values), so the comparison isolates the subset, not the kernel's
estimate:

* ``digits``: scikit-learn's digits; a tanh MLP (64-64-64) pre-trained on digits 0–4 (Adam,
  200 full-batch steps), a fresh head, fine-tuned on the first N = 896 images of digits 5–9
  by full-batch GD (every layer), lr 0.5, T = 300 (samples share most of their kernel);
* ``random-mlp``: a freshly initialised tanh MLP (256-256-2) on N = 1024 Gaussian inputs of
  dimension 256 with labels from a random hyperplane, full-batch GD, lr 0.3, T = 300 (nearly
  orthogonal inputs: a large per-sample share of the kernel, the hard case for a subset).

For each N0 and seeded subset, three simulations with ``dataset_size=N``
(``lightning_ttp.pipeline.simulate``, the package's discrete GD) against the full-N kernel's curve:

* ``subset``: the kernel on N0 samples with weights 1/N0, uncorrected;
* ``mean-field``: every sample's own C × C block scaled by N0/N, then the nearest PSD kernel
  (the rejected correction, kept as the reference of what not to do);
* ``standing for N`` (the package's default, ``lightning_ttp.pipeline.estimate.standing_for``): only
  the certainly unshared share α of the self blocks is weighted N0/N.

Prints T_ε (ε = 0.4, 0.1, 0.01) and the loss at steps 50 / 150 / 300 of each, the relative
ε-time error against the full-N curve, the medians, and writes
``benchmarks/results/subset_bias.json``.

    python benchmarks/subset_bias.py            # ~2 min on 2 CPU cores
    python benchmarks/subset_bias.py --tasks digits --subsets 64 128
"""

from __future__ import annotations

import argparse
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
from lightning_ttp.pipeline.estimate import KernelEstimate, estimate_kernel, standing_for  # noqa: E402
from lightning_ttp.pipeline.simulate import simulate  # noqa: E402

EPS = (0.4, 0.1, 0.01)
STEPS = 300
VARIANTS = ("subset", "mean-field", "standing for N")


def digits_task() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
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
    return model, x[target][:896], y[target][:896] - 5, 0.5


def random_mlp_task() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=gen)
    y = (x @ torch.randn(256, generator=gen) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 2))
    return model, x, y, 0.3


TASKS = {"digits": digits_task, "random-mlp": random_mlp_task}


def restricted(full: KernelEstimate, idx: torch.Tensor) -> KernelEstimate:
    """The kernel estimate of the samples ``idx``: the full kernel's rows and columns."""
    n, c = full.num_samples, full.num_outputs
    g = full.grams[0].reshape(n, c, n, c)[idx][:, :, idx].reshape(len(idx) * c, len(idx) * c)
    return KernelEstimate(full.outputs[idx], full.targets[idx], [g], "full", full.loss)


def mean_field(ke: KernelEstimate, dataset_size: int) -> KernelEstimate:
    """Every self block × N0/N, negative eigenvalues clipped (the nearest PSD kernel)."""
    n0, c = ke.num_samples, ke.num_outputs
    g = ke.grams[0].to(torch.float64).clone()
    blocks = g.view(n0, c, n0, c)
    idx = torch.arange(n0)
    blocks[idx, :, idx, :] *= n0 / dataset_size
    vals, vecs = torch.linalg.eigh(g)
    return KernelEstimate(ke.outputs, ke.targets, [((vecs * vals.clamp(min=0.0)) @ vecs.T).to(ke.grams[0].dtype)],
                          "full", ke.loss)


def summary_of(prediction) -> dict:
    return {"training_time": {str(e): prediction.training_time(e) for e in EPS},
            "loss": {str(t): float(prediction.loss[t]) for t in (50, 150, STEPS)}}


def errors(row: dict, reference: dict) -> dict:
    out = {}
    for e in map(str, EPS):
        p, r = row["training_time"][e], reference["training_time"][e]
        out[e] = None if p is None or not r else abs(p - r) / r
    return out


def run_task(name: str, subsets: list[int], seeds: int) -> tuple[dict, list[dict]]:
    model, x, y, lr = TASKS[name]()
    n = len(y)
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=lr))
    full = estimate_kernel(model, x, y, spec, kernel="full")
    reference = summary_of(simulate(full, spec, STEPS, None))
    head = "".join(f"{'T(ε=' + format(e, 'g') + ')':>9}" for e in EPS) + "".join(f"{'L_' + str(t):>8}"
                                                                                 for t in (50, 150, STEPS))
    print(f"\n{name}: full-batch GD, lr {lr}, N = {n}, T = {STEPS}; the full-N kernel's curve is the reference")
    print(f"{'kernel':<40}{head}   ε-time error vs full N")
    print(f"{'full N = ' + str(n):<40}" + "".join(f"{reference['training_time'][str(e)]!s:>9}" for e in EPS)
          + "".join(f"{reference['loss'][str(t)]:>8.4f}" for t in (50, 150, STEPS)))
    rows = []
    for n0 in subsets:
        for seed in range(seeds):
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n0].sort().values
            ke = restricted(full, idx)
            stood = standing_for(ke, n)
            kernels = {"subset": ke, "mean-field": mean_field(ke, n), "standing for N": stood}
            for variant, kernel in kernels.items():
                row = summary_of(simulate(kernel, spec, STEPS, None, dataset_size=n))
                row.update(task=name, n0=n0, seed=seed, kernel=variant, error=errors(row, reference))
                if variant == "standing for N":
                    row["alpha"] = stood.info.get("idiosyncratic_share", [0.0])[0]
                rows.append(row)
                err = "  ".join("n/a" if v is None else f"{v:.0%}" for v in row["error"].values())
                alpha = f" α={row['alpha']:.2f}" if "alpha" in row else ""
                print(f"{f'N0 = {n0}, seed {seed}, {variant}{alpha}':<40}"
                      + "".join(f"{row['training_time'][str(e)]!s:>9}" for e in EPS)
                      + "".join(f"{row['loss'][str(t)]:>8.4f}" for t in (50, 150, STEPS)) + f"   {err}")
    return reference, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--subsets", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    summary = {}
    for name in args.tasks:
        reference, rows = run_task(name, args.subsets, args.seeds)
        summary[name] = {"reference": reference, "rows": rows, "median_error": {}}
        for variant in VARIANTS:
            errs = [v for r in rows if r["kernel"] == variant for v in r["error"].values() if v is not None]
            summary[name]["median_error"][variant] = float(np.median(errs))
            print(f"{name}: median ε-time error vs full N, {variant}: {np.median(errs):.1%} (max {np.max(errs):.1%})")
    _results.save("subset_bias", summary)


if __name__ == "__main__":
    main()
