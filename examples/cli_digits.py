"""LightningCLI: lightning_ttp's three callbacks configured in YAML.

The model and the data are defined here; the Trainer, its callbacks (``TrainingTimePredictor``,
``EarlyGiveUp``, ``ETAProgressBar``) and the hyper-parameters come from ``cli_digits.yaml``.
The data is scikit-learn's digits (it ships with scikit-learn: nothing is downloaded). The MLP
is trained from scratch, where the linearisation behind the prediction is least accurate: the
closed-loop refinement corrects it as training runs (``./run demo`` shows fine-tuning)::

    python examples/cli_digits.py fit --config examples/cli_digits.yaml
    python examples/cli_digits.py fit --config examples/cli_digits.yaml --trainer.max_epochs 3
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsData(LightningDataModule):
    """scikit-learn's 8×8 digits, pixels scaled to [0, 1], a seeded train/validation split."""

    def __init__(
        self, batch_size: int = 32, val_size: int = 400, seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(
            len(y), generator=torch.Generator().manual_seed(self.seed)
        )
        val, train = order[: self.val_size], order[self.val_size :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(LightningModule):
    """An MLP 64-hidden-hidden-10, SGD; logs ``val_acc`` for ``EarlyGiveUp``."""

    def __init__(
        self, hidden: int = 64, lr: float = 0.05, momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
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
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
        )


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args=None``: the command line); returns it (tests read it)."""
    torch.set_num_threads(1)  # a model this small trains faster on one CPU thread
    return LightningCLI(
        DigitsClassifier, DigitsData, args=args, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    main()
