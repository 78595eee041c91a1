"""Overhead of TrainingTimePredictor + ETAProgressBar on a Lightning fit (CPU).

What is measured
----------------
* per-step cost *after fit start*: seconds per optimiser step of the same fit with
  Lightning's ``TQDMProgressBar`` alone vs. ``TrainingTimePredictor`` + ``ETAProgressBar``
  (bars refresh every step in both, output discarded). Step times come from a timing
  callback (wall clock between consecutive ``on_train_batch_end``); the first 10 steps are
  dropped. Reported: median step (the typical step) and mean step (includes the periodic
  closed-loop refinements and logging). Runs alternate A/B/A/B… to share the machine's
  noise; the overhead is the ratio of the medians over repeats. Because the machine is
  shared, the A/B difference is noisy at the 1 % level; the time spent inside our hooks
  (``TrainingTimePredictor.on_train_batch_end`` incl. refinements, and the ETA text of the
  bar) is therefore also measured directly and reported per step.
* one-off cost at fit start: the prediction's seconds (kernel + simulations) relative to
  the whole fit's wall clock.

Workload: an MLP 256-1024-1024-10 on 8192 synthetic samples, batch 64, cross-entropy, SGD
with momentum; the predictor with its defaults (256 kernel samples, 8 MC paths).
``--quick``: 300 steps × 2 repeats; default 1000 steps × 3 repeats. Torch uses one thread.

Run: ``python benchmarks/overhead.py [--quick]``; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402

from lightning_ttp.callbacks import ETAProgressBar, TrainingTimePredictor  # noqa: E402

WARMUP = 10


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.fit_start = 0.0
        self.fit_end = 0.0

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module):
        self.fit_end = time.perf_counter()


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 256, generator=g)
    y = (x[:, :10] + 0.5 * torch.randn(8192, 10, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def _timed(obj, name: str, acc: dict) -> None:
    """Wrap ``obj.name`` to accumulate its wall clock in ``acc[name]``."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        tick = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - tick

    setattr(obj, name, wrapper)


def fit(steps: int, with_predictor: bool) -> dict:
    timer = StepTimer()
    hooks: dict[str, float] = {}
    if with_predictor:
        predictor = TrainingTimePredictor(verbose=False, plot=False)
        bar = ETAProgressBar(refresh_rate=1)
        _timed(predictor, "on_train_batch_end", hooks)  # includes the (time-budgeted) refinements
        _timed(bar, "_eta_text", hooks)  # what the ETA bar adds to Lightning's bar
        callbacks = [timer, predictor, bar]
    else:
        predictor = None
        callbacks = [timer, pl.callbacks.TQDMProgressBar(refresh_rate=1)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_model_summary=False,
    )
    pl.seed_everything(0, verbose=False)
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        trainer.fit(MLP(), data())
    durations = np.diff(np.asarray(timer.stamps))[WARMUP:]
    out = {
        "median_step": float(np.median(durations)),
        "mean_step": float(np.mean(durations)),
        "fit_seconds": timer.fit_end - timer.fit_start,
    }
    if predictor is not None:
        out["prediction_seconds"] = float(predictor.state_dict()["cost_seconds"])
        out["predicted_ok"] = predictor.prediction is not None
        out["hook_seconds_per_step"] = sum(hooks.values()) / max(len(timer.stamps), 1)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 steps x 2 repeats")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    steps, repeats = (300, 2) if args.quick else (1000, 3)
    runs: dict[str, list[dict]] = {"plain": [], "predictor": []}
    for _ in range(repeats):
        runs["plain"].append(fit(steps, False))
        runs["predictor"].append(fit(steps, True))

    def agg(name: str, key: str) -> float:
        return float(np.median([r[key] for r in runs[name]]))

    med_plain, med_pred = agg("plain", "median_step"), agg("predictor", "median_step")
    mean_plain, mean_pred = agg("plain", "mean_step"), agg("predictor", "mean_step")
    hook = agg("predictor", "hook_seconds_per_step")
    one_off = agg("predictor", "prediction_seconds")
    fit_s = agg("predictor", "fit_seconds")
    print(f"Overhead of TrainingTimePredictor + ETAProgressBar ({steps} steps × {repeats} repeats, CPU, 1 thread)")
    print(f"{'':<28}{'TQDM bar only':>16}{'predictor + ETA bar':>22}{'overhead':>10}")
    print(f"{'median s/step':<28}{med_plain * 1e3:>13.3f} ms{med_pred * 1e3:>19.3f} ms"
          f"{(med_pred / med_plain - 1):>10.2%}")
    print(f"{'mean s/step (incl. refits)':<28}{mean_plain * 1e3:>13.3f} ms{mean_pred * 1e3:>19.3f} ms"
          f"{(mean_pred / mean_plain - 1):>10.2%}")
    print(f"{'our hooks, measured directly':<28}{'':>16}{hook * 1e6:>16.1f} µs/step"
          f"{hook / med_plain:>10.2%}")
    print(f"one-off prediction at fit start: {one_off:.2f} s = {one_off / fit_s:.1%} of the {fit_s:.1f} s fit")
    summary = {
        "benchmark": "overhead",
        "steps": steps,
        "repeats": repeats,
        "median_step_ms_plain": round(med_plain * 1e3, 4),
        "median_step_ms_predictor": round(med_pred * 1e3, 4),
        "overhead_median": round(med_pred / med_plain - 1, 4),
        "overhead_mean": round(mean_pred / mean_plain - 1, 4),
        "hook_us_per_step": round(hook * 1e6, 2),
        "hook_share_of_step": round(hook / med_plain, 5),
        "prediction_seconds": round(one_off, 3),
        "prediction_share_of_fit": round(one_off / fit_s, 4),
        "target_overhead": 0.01,
        "target_met_direct": bool(hook / med_plain <= 0.01),
        "target_met_ab": bool(mean_pred / mean_plain - 1 <= 0.01),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
