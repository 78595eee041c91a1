"""The cost budget on a transformer fine-tune: prediction cost vs. the run, and what it costs in accuracy.

Task (generated, nothing downloaded): sequences of 24 tokens over a vocabulary of 64; a
2-layer Transformer encoder (d=96, 4 heads) with a mean-pooled linear head is pre-trained to
tell which of 5 token groups is most frequent (task A), then every layer is fine-tuned with SGD
+ momentum on new sequences where the count is position-weighted and the classes are renamed
(task B). We time

* the real fine-tuning loop (``--steps`` optimiser steps of batch 32), and its parts
  (data, forward + backward, zero_grad + step, ``loss.item()``),
* the prediction with the defaults (the cost cap: the exact kernel unless it counts more
  multiply-adds than the run), and its parts (the cap's count, the kernel's passes and
  contraction, J·w0/Adam extras, the simulation and its fixed part), read by wrapping the
  functions ``predict_run`` calls,
* the prediction with ``budget=None`` (the exact kernel on all ``--num-samples`` samples),

and print, next to each measured part, the cap's count of it (``KernelChoice.components``,
``run_macs``) and the seconds per counted GMAC (how well counts stand for time on this
machine); and compare both predicted
ε-training-times with the real one (mini-batch losses smoothed over one epoch, the package's
definition). Prints tables and writes ``benchmarks/results/budget.json``.

    python benchmarks/budget.py            # ~2 min on 2 CPU cores
    python benchmarks/budget.py --quick    # 1000 steps on 512 samples (~45 s)
    python benchmarks/budget.py --sweep    # + exact/trace kernels on 64/128/256 samples (~1 min more)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ttp import kernel as kernel_module
from lightning_ttp import predict_training_time
from lightning_ttp.dynamics import OptimizerSpec, still_falling
from lightning_ttp.pipeline import predict as api
from lightning_ttp.pipeline.data import sample_subset, split_batch
from lightning_ttp.pipeline.estimate import estimate_kernel
from lightning_ttp.pipeline.plan import plan_run
from lightning_ttp.pipeline.refine import default_smoothing_window, epsilon_training_time, smooth_losses
from lightning_ttp.pipeline.simulate import simulate_plan

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, LENGTH, CLASSES = 64, 24, 5


class Encoder(nn.Module):
    def __init__(self, d: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.position = nn.Parameter(torch.randn(LENGTH, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens) + self.position).mean(1))


def make_task(n: int, seed: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    # which of 5 token groups is most frequent, counted with position weights in task B
    weights = torch.ones(LENGTH) if task == "A" else torch.linspace(0.5, 1.5, LENGTH)
    counts = torch.stack([(((tokens % CLASSES) == c).float() * weights).sum(1) for c in range(CLASSES)], 1)
    labels = counts.add(torch.rand(n, CLASSES, generator=g) * 0.1).argmax(1)
    return tokens, labels if task == "A" else torch.tensor([3, 0, 4, 1, 2])[labels]  # B: new class names


def pretrain(model: nn.Module, steps: int) -> None:
    x, y = make_task(2048, 0, "A")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def fine_tune(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
              steps: int) -> tuple[list, float, dict[str, float]]:
    """The real loop; also its parts' seconds (data, forward + backward, zero_grad + step, loss.item())."""
    losses, parts = [], dict.fromkeys(("data", "forward_backward", "optimizer", "item"), 0.0)
    start = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        parts[name] += now - tick
        tick = now

    while len(losses) < steps:
        for x, y in loader:
            lap("data")
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            lap("forward_backward")
            opt.step()
            lap("optimizer")
            losses.append(loss.item())
            lap("item")
            if len(losses) == steps:
                break
        tick = time.perf_counter()
    return losses, time.perf_counter() - start, parts


class Recorder:
    """Wall-clock of the prediction's parts, read by wrapping the functions ``predict_run`` calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.ntk_timings: dict[str, float] = {}
        self.patches = [(api, "choose_kernel"), (api, "estimate_kernel"), (api, "simulate_plan"),
                        (kernel_module, "empirical_ntk")]

    def __enter__(self) -> Recorder:
        self.saved = [getattr(mod, name) for mod, name in self.patches]
        for (mod, name), fn in zip(self.patches, self.saved, strict=True):
            setattr(mod, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for (mod, name), fn in zip(self.patches, self.saved, strict=True):
            setattr(mod, name, fn)

    def _wrap(self, name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] = time.perf_counter() - start
            if name == "empirical_ntk":
                self.ntk_timings = dict(out.timings)
            return out
        return wrapper

    def components(self, total: float, prediction) -> dict[str, float]:
        """The measured seconds of the parts the cap counts (``KernelChoice.components``)."""
        s, t, d = self.seconds, self.ntk_timings, prediction.diagnostics
        parts = {"cap": s.get("choose_kernel", 0.0), "passes": t["passes"] + t["fallback"],
                 "contraction": t["contraction"], "extras": s["estimate_kernel"] - s["empirical_ntk"],
                 "simulation": d.simulation_seconds, "simulation_fixed": s["simulate_plan"] - d.simulation_seconds}
        parts["other"] = total - sum(parts.values())
        return parts


def _epsilon_errors(pred, real_curve) -> tuple[dict, str]:
    cells, errors = "", {}
    for eps in (0.1, 0.01):
        predicted, real = pred.training_time(eps), epsilon_training_time(real_curve, eps)
        if still_falling(real_curve, eps):
            real = None  # not converged within the run: no ε-time to compare with
        err = None if predicted is None or not real else abs(predicted - real) / real
        errors[str(eps)] = {"predicted": predicted, "real": real, "relative_error": err}
        cells += f"{predicted!s:>12}{'n/a' if err is None else format(err, '.0%'):>8}"
    return errors, cells


def sweep(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, steps: int, real_curve) -> list[dict]:
    """The exact and the trace kernel on 64, 128 and 256 samples: what the budget trades."""
    plan, spec = plan_run(loader, opt, steps), OptimizerSpec.from_optimizer(opt)
    print(f"\n{'subset':>7}{'kernel':>8}{'seconds':>9}" + "".join(
        f"{'T(ε=' + format(e, 'g') + ')':>12}{'error':>8}" for e in (0.1, 0.01)))
    out = []
    for n in (64, 128, 256):
        inputs, targets = split_batch(sample_subset(loader, n, 0)[0])
        for kind in ("full", "trace"):
            start = time.perf_counter()
            pred = simulate_plan(estimate_kernel(model, inputs, targets, spec, kernel=kind), spec, plan)
            seconds = time.perf_counter() - start
            errors, cells = _epsilon_errors(pred, real_curve)
            print(f"{n:>7}{kind:>8}{seconds:>9.1f}{cells}")
            out.append({"num_samples": n, "kernel": kind, "seconds": seconds, "training_times": errors})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--quick", action="store_true", help="1000 steps on 512 samples")
    parser.add_argument("--sweep", action="store_true",
                        help="also the exact and trace kernels on 64, 128, 256 samples (their ε-times and cost)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.train_size = 1000, 512
    torch.manual_seed(0)
    model = Encoder()
    pretrain(model, 300)
    x, y = make_task(args.train_size, 1, "B")
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))

    def optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9)

    rows = {}
    for name, budget in (("defaults", api.DEFAULT_BUDGET), ("exact (budget=None)", None)):
        with Recorder() as rec:
            start = time.perf_counter()
            pred = predict_training_time(model, loader, optimizer(model), args.steps,
                                         num_samples=args.num_samples, budget=budget)
            seconds = time.perf_counter() - start
        rows[name] = {"seconds": seconds, "prediction": pred, "actual": rec.components(seconds, pred)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real_losses, train_seconds, run_parts = fine_tune(model, loader, optimizer(model), args.steps)
    model.load_state_dict(state)
    real_curve = smooth_losses(real_losses, default_smoothing_window(len(loader), False))
    summary = {"steps": args.steps, "train_seconds": train_seconds, "rows": {}}
    print(f"\ntransformer fine-tune: {args.steps} steps of batch 32 on {args.train_size} sequences, "
          f"training loop {train_seconds:.1f} s")
    print(f"{'prediction':<22}{'seconds':>9}{'/ run':>8}{'kernel':>22}" + "".join(
        f"{'T(ε=' + format(e, 'g') + ')':>12}{'error':>8}" for e in (0.1, 0.01)))
    for name, row in rows.items():
        pred = row["prediction"]
        kernel = f"{pred.diagnostics.kernel} on {pred.diagnostics.kernel_samples}"
        errors, cells = _epsilon_errors(pred, real_curve)
        ratio = row["seconds"] / train_seconds
        print(f"{name:<22}{row['seconds']:>9.1f}{ratio:>8.1%}{kernel:>22}{cells}")
        summary["rows"][name] = {"seconds": row["seconds"], "ratio_to_run": ratio, "kernel": kernel,
                                 "choice": pred.diagnostics.get("budget") or {}, "actual_components": row["actual"],
                                 "training_times": errors}
    print("real ε-times (smoothed over one epoch): " + ", ".join(
        f"ε={e:g}: " + ("not converged" if still_falling(real_curve, e) else str(epsilon_training_time(real_curve, e)))
        for e in (0.1, 0.01)))

    choice = summary["rows"]["defaults"]["choice"]
    counted = choice.get("components", {})
    actual = rows["defaults"]["actual"]
    kernel_actual = actual["passes"] + actual["contraction"] + actual["extras"]
    sim_actual = actual["simulation"] + actual["simulation_fixed"]
    pairs = {"kernel (passes + contraction + extras)": (counted.get("passes", 0) + counted.get("contraction", 0)
                                                        + counted.get("extras", 0), kernel_actual),
             "simulation": (counted.get("simulation", 0), sim_actual),
             "the run": (choice.get("run_macs", float("nan")), train_seconds)}
    print(f"\nthe cost cap's counts (multiply-adds, never timed) vs the measured seconds; "
          f"choice: {choice.get('kernel')} on {choice.get('num_samples')}")
    print(f"{'part':<40}{'counted MACs':>14}{'seconds':>10}{'s / GMAC':>10}")
    for part, (macs, secs) in pairs.items():
        print(f"{part:<40}{macs:>14.3g}{secs:>10.2f}{secs / macs * 1e9 if macs else float('nan'):>10.3f}")
    print(f"{'prediction / run':<40}{choice.get('predicted_macs', 0) / choice.get('run_macs', 1):>14.2%}"
          f"{rows['defaults']['seconds'] / train_seconds:>10.2%}")
    summary["counts_vs_seconds"] = {k: {"macs": m, "seconds": t} for k, (m, t) in pairs.items()}
    summary["run"] = {"actual": run_parts}
    if args.sweep:
        summary["sweep"] = sweep(model, loader, optimizer(model), args.steps, real_curve)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "budget.json").write_text(json.dumps(summary, indent=1, default=float))
    print(json.dumps({"run_seconds": train_seconds, **{k: {"ratio_to_run": v["ratio_to_run"], "kernel": v["kernel"]}
                                                       for k, v in summary["rows"].items()}}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    np.set_printoptions(precision=4)
    main()
