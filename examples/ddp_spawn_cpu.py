"""``strategy="ddp_spawn"`` on 2 CPU processes (gloo) with lightning_ttp's three callbacks.

Each process trains on its half of every epoch (Lightning's DistributedSampler). The predictor
plans for the global batch (2 processes × 32) and splits the kernel subset across the two
processes (each runs the passes of its half; the Gram is assembled with the strategy's
``all_gather``); both hold rank zero's prediction, so the ETA bar and the log are the same on both. EarlyGiveUp
combines its decision across ranks (any rank giving up stops all). With ``ddp_spawn`` the
callbacks live in the spawned processes: what they found is printed there, by rank zero.
The data is scikit-learn's digits (shipped with scikit-learn: nothing is downloaded)::

    python examples/ddp_spawn_cpu.py
    python examples/ddp_spawn_cpu.py --epochs 2 --checkpoint-epoch 2   # quicker
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ttp import EarlyGiveUp, ETAProgressBar, TrainingTimePredictor


class DigitsMLP(LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def on_fit_end(self) -> None:
        # runs in every spawned process; the callbacks' results are printed by rank zero
        if self.trainer.is_global_zero:
            predictor = next(
                c
                for c in self.trainer.callbacks
                if isinstance(c, TrainingTimePredictor)
            )
            give_up = next(
                c for c in self.trainer.callbacks if isinstance(c, EarlyGiveUp)
            )
            steps = (
                predictor.prediction.training_time(0.1)
                if predictor.prediction
                else None
            )
            print(
                f"[ddp] world size {self.trainer.world_size}: predicted ε=0.1 at step {steps}, "
                f"real {predictor.real_training_time(0.1)}; give-up: {give_up.reason}"
            )


def loaders() -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1200], order[1200:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=200),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--checkpoint-epoch", type=int, default=10)
    parser.add_argument("--out", default="runs/ddp_spawn_cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # two processes on a CPU: one thread each
    seed_everything(0, verbose=False)
    trainer = Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,  # gloo is the CPU backend
        max_epochs=args.epochs,
        default_root_dir=args.out,
        log_every_n_steps=5,
        callbacks=[
            TrainingTimePredictor(num_samples=128),
            EarlyGiveUp(
                checkpoint_epoch=args.checkpoint_epoch, accuracy_metric="val_acc"
            ),
            ETAProgressBar(refresh_rate=10),
        ],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    train, val = loaders()
    trainer.fit(DigitsMLP(), train, val)


if (
    __name__ == "__main__"
):  # required by ddp_spawn: the spawned processes import this file
    main()
