"""Fine-tune a pre-trained backbone on new classes and predict how long it takes.

The main job of the README (``./run demo``). Everything ships with scikit-learn, nothing is
downloaded:

1. pre-train a small MLP backbone on digits 0–4 of ``sklearn.datasets.load_digits`` (once;
   the weights are cached under ``runs/cache/``),
2. fine-tune it with PyTorch Lightning on 5 *other* classes (digits 5–9, 200 images) with
   :class:`~lightning_ttp.callbacks.TrainingTimePredictor` and
   :class:`~lightning_ttp.callbacks.ETAProgressBar`, in two phases (the common "LP-FT"
   recipe): a linear probe (new head, frozen backbone), then all layers (with a what-if
   table and ``EarlyGiveUp`` watching the validation spectra),
3. print for each phase the predicted vs. real training time — open loop at fit start and
   what the progress bar said (the closed loop, live) after 10 / 25 / 50 % of the run — and
   save the plots
   (``runs/finetune_digits/<phase>/version_*/ttp_prediction.png``).

Usage::

    python examples/finetune_digits.py [--steps 300] [--lr 0.02] [--batch-size 32] [--lightning]

``--lightning`` uses the ``lightning.pytorch`` namespace instead of ``pytorch_lightning``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


def load_digits_split(classes: tuple[int, ...], train_size: int | None, seed: int):
    """Images (N, 64) scaled to [0, 1] and labels re-indexed 0..len(classes)-1."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep]
    remap = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([remap[int(v)] for v in y])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    if train_size is None:
        return (x, y), None
    return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


def make_backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh())


def pretrained_backbone(cache_dir: Path, seed: int = 0) -> nn.Module:
    """The backbone pre-trained on digits 0-4 (cached: trained only on the first run)."""
    backbone = make_backbone()
    key = hashlib.sha1(repr((PRETRAIN_CLASSES, seed, str(backbone))).encode()).hexdigest()[:10]
    path = cache_dir / f"digits_backbone_{key}.pt"
    if path.exists():
        backbone.load_state_dict(torch.load(path, weights_only=True))
        print(f"[demo] loaded the pre-trained backbone from {path}")
        return backbone
    torch.manual_seed(seed)
    backbone = make_backbone()
    (x, y), _ = load_digits_split(PRETRAIN_CLASSES, None, seed)
    model = nn.Sequential(backbone, nn.Linear(64, len(PRETRAIN_CLASSES)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(40):  # full-batch epochs over ~900 images: a second on a CPU
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), path)
    print(f"[demo] pre-trained the backbone on digits {PRETRAIN_CLASSES} "
          f"(train accuracy {acc:.1%}, {time.perf_counter() - start:.1f} s); cached at {path}")
    return backbone


def build_module(pl, backbone: nn.Module, head: nn.Module, lr: float, momentum: float, head_only: bool):
    class FineTuner(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head
            self.backbone.requires_grad_(not head_only)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.SGD(params, lr=lr, momentum=momentum)

    return FineTuner()


def run_phase(pl, name: str, module, train, val, args, *, steps: int, what_if=None, give_up: bool = False) -> dict:
    """One Lightning fit with the predictor and the ETA bar; prints predicted vs. real."""
    from lightning_ttp import EarlyGiveUp, ETAProgressBar, TrainingTimePredictor
    from lightning_ttp.dynamics import still_falling

    predictor = TrainingTimePredictor(epsilons=(0.1, 0.01), num_samples=args.kernel_samples, what_if=what_if)
    fractions = (0.1, 0.25, 0.5)
    live: dict[float, dict[float, int | None]] = {}

    class LiveRecorder(pl.Callback):
        """What the predictor (and so the bar) said at 10 / 25 / 50 % of the run."""

        def on_train_batch_end(self, trainer, *args) -> None:
            for frac in fractions:
                if trainer.global_step == round(frac * steps) and frac not in live:
                    live[frac] = {eps: predictor.converge_step(eps) for eps in predictor.epsilons}

    callbacks = [predictor, LiveRecorder(), ETAProgressBar(refresh_rate=10)]
    if give_up:
        callbacks.append(EarlyGiveUp(mode="warn", checkpoint_epoch=5))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks,
        logger=pl.loggers.CSVLogger(args.out, name=name.replace(" ", "_")),
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
        num_sanity_val_steps=0, limit_val_batches=None if val is not None else 0,
    )
    print(f"\n[demo] ===== {name}: {steps} optimiser steps =====")
    start = time.perf_counter()
    trainer.fit(module, train, val)
    fit_seconds = time.perf_counter() - start
    pred = predictor.prediction
    if pred is None:
        raise SystemExit("[demo] the prediction failed; see the warning above.")
    sps = predictor.seconds_per_step() or fit_seconds / max(trainer.global_step, 1)
    rows = []
    fmt = lambda v: "n/a" if v is None else str(v)  # noqa: E731
    print(f"\n[demo] {name}: optimiser steps to converge (ε-training-time) and time")
    print(f"{'ε':>6} {'predicted':>10} {'@10%':>6} {'@25%':>6} {'@50%':>6} {'real':>6}   "
          f"{'predicted time':>14} {'real time':>10}")
    for eps in predictor.epsilons:
        # "n/c": not converged within the run (still falling at its last step), so no ε-time
        p = pred.training_time(eps) if pred.converged_within_run(eps) else "n/c"
        refined = {f: live.get(f, {}).get(eps) for f in fractions}
        real = predictor.real_training_time(eps)
        if real is not None and still_falling(predictor.real_curve(), eps):
            real = "n/c"
        rows.append({"eps": eps, "predicted": p, "refined": {str(f): v for f, v in refined.items()}, "real": real})
        ptime = f"{p * sps:.1f} s" if isinstance(p, int) else "n/a"
        rtime = f"{real * sps:.1f} s" if isinstance(real, int) else "n/a"
        print(f"{eps:>6g} {fmt(p):>10} {fmt(refined[0.1]):>6} {fmt(refined[0.25]):>6} {fmt(refined[0.5]):>6} "
              f"{fmt(real):>6}   {ptime:>14} {rtime:>10}")
    cost = float(predictor.cost_seconds or 0.0)
    what_if_text = f" (+ {predictor.what_if_seconds:.2f} s what-if table)" if what_if else ""
    print(f"[demo] fit: {trainer.global_step} steps in {fit_seconds:.1f} s ({sps * 1000:.1f} ms/step); "
          f"prediction at fit start: {cost:.2f} s{what_if_text}; max stable lr (GD): "
          f"{pred.diagnostics.get('max_stable_lr', float('nan')):.3g}")
    plot = getattr(predictor, "plot_path", None)
    if plot:
        print(f"[demo] plot: {plot}")
    return {"phase": name, "steps": trainer.global_step, "fit_seconds": round(fit_seconds, 2),
            "prediction_seconds": round(cost, 2), "what_if_seconds": round(predictor.what_if_seconds, 2),
            "training_times": rows, "plot": plot}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of each phase")
    parser.add_argument("--probe-lr", type=float, default=0.3, help="phase 1: head only, SGD")
    parser.add_argument("--lr", type=float, default=0.02, help="phase 2: all layers, SGD + momentum")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=200, help="fine-tuning images (digits 5-9)")
    parser.add_argument("--kernel-samples", type=int, default=200, help="samples in the NTK subset")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune_digits")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "cache")
    parser.add_argument("--lightning", action="store_true", help="use lightning.pytorch instead of pytorch_lightning")
    args = parser.parse_args()

    if args.lightning:
        import lightning.pytorch as pl
    else:
        import pytorch_lightning as pl

    torch.set_num_threads(1)
    backbone = pretrained_backbone(args.cache_dir)
    (x, y), (xv, yv) = load_digits_split(FINETUNE_CLASSES, args.train_size, seed=0)
    train = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(xv[:200], yv[:200]), batch_size=200)
    torch.manual_seed(1)
    head = nn.Linear(64, len(FINETUNE_CLASSES))

    # phase 1, linear probe: a new head on the frozen backbone (linear in its parameters:
    # the linearised prediction is exact up to mini-batch noise)
    probe = build_module(pl, backbone, head, args.probe_lr, 0.0, head_only=True)
    results = [run_phase(pl, "linear probe", probe, train, None, args, steps=args.steps)]
    # phase 2, fine-tune all layers from the probed head (LP-FT), with a what-if table
    full = build_module(pl, backbone, head, args.lr, args.momentum, head_only=False)
    what_if = {"lr": [args.lr / 2, args.lr * 2], "batch_size": [args.batch_size * 4], "momentum": [0.0]}
    results.append(run_phase(pl, "fine-tune all layers", full, train, val, args, steps=args.steps,
                             what_if=what_if, give_up=True))
    print(json.dumps({"demo": "finetune_digits", "phases": results}))


if __name__ == "__main__":
    main()
