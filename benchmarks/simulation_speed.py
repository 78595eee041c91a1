"""Cost of one simulated mini-batch step: the batch's rows of Θ vs the dense product (CPU, one thread).

For each (N, C, |B|, P) the Monte Carlo simulator (``dynamics.simulate_minibatch``, SGD with
momentum 0.9, cross-entropy, a random PSD float32 Gram) runs ``--steps`` steps twice in this
process, alternating, ``--repeats`` times:

* **rows**: the package's default; a batch is kept as its sample indices and a step reads
  only the batch's rows of Θ (``torch.nn.functional.embedding_bag``);
* **dense**: the same batches as dense (P, N) weights, one (P, N·C) × (N·C, N·C) product per
  step (what the simulator did before).

Both must give the same curves (checked: largest relative difference of the losses, float32
rounding only). Reported: µs per step (median of the repeats) and dense / rows. The rows are
also timed for a linear-probe Gram simulated as its Kronecker factor K (C times fewer
multiply-adds, ``dynamics.kronecker_factor``).

Run: ``python benchmarks/simulation_speed.py [--quick]``; prints a table and a JSON summary
(``benchmarks/results/simulation_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import save  # noqa: E402

from lightning_ttp.dynamics import BatchSampler, OptimizerSpec, get_loss, simulate_discrete  # noqa: E402
from lightning_ttp.dynamics.batch import Batch  # noqa: E402

CASES = [(128, 5, 32, 8), (256, 5, 32, 8), (256, 10, 32, 8), (256, 10, 64, 8), (512, 10, 32, 8)]
QUICK = [(128, 5, 32, 8), (256, 10, 32, 8)]


def problem(n: int, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n * c, n * c // 2, generator=g)
    gram = (a @ a.T / (n * c)).float()
    features = torch.randn(n, 16, generator=g)
    probe = (features @ features.T / 16).float()  # a linear probe's factor K (Θ = K ⊗ I_C)
    f0 = torch.randn(n, c, generator=g, dtype=torch.float64) * 0.1
    return gram, probe, f0, torch.randint(0, c, (n,), generator=g)


def run(gram, f0, y, batch: int, paths: int, steps: int, dense: bool) -> tuple[float, np.ndarray]:
    spec = OptimizerSpec.sgd(0.01, momentum=0.9)
    sampler = BatchSampler(f0.shape[0], batch, paths, seed=0)

    def batches(t: int) -> Batch:
        b = sampler.batch(t)
        return Batch(b.dense(f0.shape[0])) if dense else b

    start = time.perf_counter()
    res = simulate_discrete(f0, y, [gram], get_loss("cross_entropy"), spec, spec.constant_schedule(steps),
                            batches=batches, num_paths=paths)
    return (time.perf_counter() - start) / steps * 1e6, res.loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two sizes, 100 steps, 3 repeats")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 300)
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    for n, c, b, p in QUICK if args.quick else CASES:
        gram, probe, f0, y = problem(n, c)
        run(gram, f0, y, b, p, 5, False)  # warm-up
        times: dict[str, list[float]] = {"rows": [], "dense": [], "probe_rows": []}
        for _ in range(repeats):
            t_rows, loss_rows = run(gram, f0, y, b, p, steps, False)
            t_dense, loss_dense = run(gram, f0, y, b, p, steps, True)
            t_probe, _ = run(probe, f0, y, b, p, steps, False)
            times["rows"].append(t_rows)
            times["dense"].append(t_dense)
            times["probe_rows"].append(t_probe)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"n": n, "c": c, "batch": b, "paths": p, "us_per_step": med,
                     "dense_over_rows": med["dense"] / med["rows"],
                     "max_rel_diff": float(np.max(np.abs(loss_rows - loss_dense) / np.abs(loss_dense)))})
    print(f"one simulated step (SGD + momentum, cross-entropy, float32 Gram, one thread), {steps} steps, "
          f"median of {repeats}")
    print(f"{'N':>5} {'C':>3} {'|B|':>4} {'P':>2} {'rows µs':>8} {'dense µs':>9} {'dense/rows':>10} "
          f"{'probe K µs':>10} {'max rel diff':>12}")
    for r in rows:
        t = r["us_per_step"]
        print(f"{r['n']:>5} {r['c']:>3} {r['batch']:>4} {r['paths']:>2} {t['rows']:>8.0f} {t['dense']:>9.0f} "
              f"{r['dense_over_rows']:>10.2f} {t['probe_rows']:>10.0f} {r['max_rel_diff']:>12.1e}")
    summary = {"benchmark": "simulation_speed", "steps": steps, "repeats": repeats, "rows": rows}
    save("simulation_speed", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
