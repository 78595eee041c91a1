"""An Optuna study whose failing trials are pruned by ``EarlyGiveUp``.

Each trial trains an MLP on scikit-learn's digits (shipped with scikit-learn: nothing is
downloaded) with a learning rate drawn by Optuna. ``EarlyGiveUp(trial=trial)`` reports s_Fv (the
predicted final accuracy, eq. 8 of the DAI paper) to the trial every validation round and, at the
checkpoint epoch, raises ``optuna.TrialPruned`` when the rule gives up: a diverged or dead network,
spectra that do not compress (s_F < t1), or a predicted final accuracy below ``target_accuracy``.
The study's own pruner is switched off (``NopPruner``) so every pruning here is EarlyGiveUp's::

    python examples/optuna_give_up.py                        # 12 trials, 30 epochs each
    python examples/optuna_give_up.py --trials 8 --epochs 11   # quicker
"""

from __future__ import annotations

import argparse

import optuna
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ttp import EarlyGiveUp


def digits_loaders(
    train_size: int = 600, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val = order[:train_size], order[train_size:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=50, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=500),
    )


class MLP(LightningModule):
    def __init__(self, lr: float) -> None:
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
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def objective(trial: optuna.Trial, args: argparse.Namespace) -> float:
    lr = trial.suggest_float("lr", 1e-4, 3.0, log=True)
    give_up = EarlyGiveUp(
        checkpoint_epoch=args.checkpoint_epoch,
        target_accuracy=args.target_accuracy,  # prune if the predicted final acc. is lower
        accuracy_metric="val_acc",
        trial=trial,  # report s_Fv every round; raise optuna.TrialPruned on give-up
        on_give_up=lambda trainer, module, decision: trial.set_user_attr(
            "give_up", decision.reason
        ),
        verbose=False,
        plot=False,  # no picture per trial
    )
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[give_up],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    torch.manual_seed(trial.number)
    train, val = digits_loaders()
    trainer.fit(
        MLP(lr), train, val
    )  # raises optuna.TrialPruned when EarlyGiveUp gives up
    return float(trainer.callback_metrics["val_acc"])


def main(argv: list[str] | None = None) -> optuna.Study:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument(
        "--epochs", type=int, default=30, help="epochs of a trial that is not pruned"
    )
    parser.add_argument(
        "--checkpoint-epoch",
        type=int,
        default=10,
        help="EarlyGiveUp decides here (paper: 10)",
    )
    parser.add_argument("--target-accuracy", type=float, default=0.9)
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # a model this small trains faster on one CPU thread
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.NopPruner(),
    )
    study.optimize(lambda trial: objective(trial, args), n_trials=args.trials)

    print(f"{'trial':>5} {'lr':>9} {'state':>8} {'epochs':>6}  result")
    for t in study.trials:
        epochs = max(t.intermediate_values, default=0)
        pruned = t.state == optuna.trial.TrialState.PRUNED
        result = t.user_attrs.get("give_up", "") if pruned else f"val_acc {t.value:.3f}"
        print(
            f"{t.number:>5} {t.params['lr']:>9.2e} {t.state.name:>8} {epochs:>6}  {result}"
        )
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    saved = sum(args.epochs - max(t.intermediate_values, default=0) for t in pruned)
    print(
        f"best: lr {study.best_params['lr']:.2e}, val_acc {study.best_value:.3f}; "
        f"{len(pruned)} of {len(study.trials)} trials pruned by EarlyGiveUp, "
        f"{saved} of {args.epochs * len(study.trials)} epochs saved"
    )
    return study


if __name__ == "__main__":
    main()
