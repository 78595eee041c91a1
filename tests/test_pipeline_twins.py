"""One pipeline: the function and the callback give the same prediction for the same run, and
the planned learning rates are the ones Lightning really uses."""

import importlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ttp import TrainingTimePredictor, predict_training_time

N, D, C = 96, 6, 3


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x @ torch.randn(D, C, generator=g)).argmax(1)
    return x, y


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))


def _optimizer(net: nn.Module, two_groups: bool) -> torch.optim.Optimizer:
    if two_groups:
        return torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.05},
                                {"params": net[2].parameters(), "lr": 0.2, "momentum": 0.5}], lr=0.1, momentum=0.9)
    return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)


SCHEDULERS = {
    "none": None,
    "epoch": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7), "epoch", 1),
    "step_freq5": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8), "step", 5),
}


def _module(ns: str, scheduler, two_groups: bool, seen: list):
    pl = importlib.import_module(ns)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def on_before_optimizer_step(self, optimizer):
            seen.append([g["lr"] for g in optimizer.param_groups])

        def configure_optimizers(self):
            opt = _optimizer(self.net, two_groups)
            if scheduler is None:
                return opt
            make, interval, frequency = scheduler
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": make(opt), "interval": interval, "frequency": frequency}}

    return Net()


def _fit(ns, tmp_path, scheduler, two_groups, steps, accumulate=1, **predictor_kwargs):
    pl = importlib.import_module(ns)
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    seen: list = []
    module = _module(ns, scheduler, two_groups, seen)
    predictor = TrainingTimePredictor(verbose=False, plot=False, refine=False, **predictor_kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         accumulate_grad_batches=accumulate, callbacks=[predictor])
    trainer.fit(module, loader)
    return predictor, np.asarray(seen), loader


@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
@pytest.mark.parametrize("schedule", ["none", "epoch", "step_freq5"])
@pytest.mark.parametrize("two_groups", [False, True])
def test_function_and_callback_give_the_same_prediction(ns, schedule, two_groups, tmp_path):
    steps = 30
    predictor, seen, loader = _fit(ns, tmp_path, SCHEDULERS[schedule], two_groups, steps, num_samples=40,
                                   num_paths=4)
    net = _net()
    opt = _optimizer(net, two_groups)
    kwargs = {}
    if SCHEDULERS[schedule] is not None:
        make, interval, frequency = SCHEDULERS[schedule]
        kwargs = dict(lr_scheduler=make(opt), scheduler_interval=interval, scheduler_frequency=frequency)
    pred = predict_training_time(net, loader, opt, steps, num_samples=40, num_paths=4, **kwargs)
    np.testing.assert_allclose(pred.loss, predictor.prediction.loss, rtol=1e-4)
    np.testing.assert_allclose(pred.loss_band[1], predictor.prediction.loss_band[1], rtol=1e-4)
    for eps in (0.1, 0.01):
        assert pred.training_time(eps) == predictor.prediction.training_time(eps)
    # the planned lrs are exactly those Lightning applied at every optimiser step
    np.testing.assert_allclose(predictor.lr_schedule, seen, rtol=1e-12)


@pytest.mark.parametrize("accumulate", [2, 3])
def test_planned_lrs_follow_lightning_under_accumulation(accumulate, tmp_path):
    every_2nd_batch = (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8), "step", 2)
    predictor, seen, _ = _fit("pytorch_lightning", tmp_path, every_2nd_batch, False, 14,
                              accumulate=accumulate, num_samples=16, num_paths=1)
    assert seen.shape == (14, 1)
    np.testing.assert_allclose(predictor.lr_schedule, seen, rtol=1e-12)
    assert len(np.unique(seen)) > 1  # the scheduler did step
