"""ETAProgressBar / RichETAProgressBar with a real Trainer, both Lightning namespaces."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ttp.callbacks import ETAProgressBar, RichETAProgressBar, TrainingTimePredictor
from lightning_ttp.callbacks.predictor import PredictorState, format_duration

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]
BARS = [ETAProgressBar, RichETAProgressBar]
STATUS = re.compile(r"converges ≈ step \d+ · ETA \d+:\d\d · run ends \d+:\d\d")


def _module(ns: str):
    pl = importlib.import_module(ns)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    return Net()


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _recorder(ns: str, bar):
    """Reads what the bar shows after every training batch (the bar's own display state)."""
    pl = importlib.import_module(ns)

    class Recorder(pl.Callback):
        seen: list[str] = []
        converge: list[int | None] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if isinstance(bar, ETAProgressBar):
                self.seen.append(str(bar.train_progress_bar.postfix))
            else:
                self.seen.append(str(bar.get_metrics(trainer, pl_module).get("ttp", "")))
            predictor = next((c for c in trainer.callbacks if isinstance(c, TrainingTimePredictor)), None)
            self.converge.append(None if predictor is None else predictor.converge_step())

    return Recorder()


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("bar_cls", BARS)
def test_bar_shows_convergence_and_eta(ns, bar_cls, tmp_path):
    pl = importlib.import_module(ns)
    bar = bar_cls(refresh_rate=1) if bar_cls is ETAProgressBar else bar_cls()
    assert isinstance(bar, pl.callbacks.ProgressBar)
    predictor = TrainingTimePredictor(num_samples=64, verbose=False, plot=False, warmup_steps=1)
    recorder = _recorder(ns, bar)
    recorder.seen = []
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=16, callbacks=[predictor, bar, recorder], logger=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
    )
    assert trainer.progress_bar_callback is bar
    trainer.fit(_module(ns), _loader(), _loader())
    assert predictor.prediction is not None
    # once a few step durations are known, the full status is displayed
    assert any(STATUS.search(text) for text in recorder.seen), recorder.seen[-3:]
    last = recorder.seen[-1]
    match = re.search(r"converges ≈ step (\d+)", last)
    # what the bar shows is the predictor's current (refined) estimate
    assert match and int(match.group(1)) == recorder.converge[-1]
    if bar_cls is ETAProgressBar:
        assert "train_loss=" in last  # Lightning's own metrics are still there


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("bar_cls", BARS)
def test_bar_without_predictor_is_the_normal_bar(ns, bar_cls, tmp_path):
    pl = importlib.import_module(ns)
    bar = bar_cls()
    recorder = _recorder(ns, bar)
    recorder.seen = []
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, callbacks=[bar, recorder], logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path),
    )
    trainer.fit(_module(ns), _loader())
    assert trainer.global_step == 4
    assert recorder.seen and not any("converges" in text for text in recorder.seen)


def test_status_text_and_eta_arithmetic():
    predictor = TrainingTimePredictor(warmup_steps=0)
    assert predictor.status_text(0) is None  # no prediction yet: bars show nothing extra

    class Pred:
        loss = [1.0, 0.5, 0.2, 0.1, 0.1]

        def training_time(self, eps):
            return 3

    predictor.state = PredictorState(prediction=Pred(), plan={"steps": 100})
    assert predictor.status_text(0) == "converges ≈ step 3"  # no timing yet
    timer = predictor._timer
    timer.start(0.0)
    for now in (2.0, 4.0, 54.0):  # one slow outlier step
        timer.step(now)
    eta = predictor.eta(1)
    assert eta["seconds_per_step"] == 2.0  # median: robust to the slow step
    assert eta["eta_converge_seconds"] == 4.0 and eta["eta_end_seconds"] == 198.0
    assert predictor.status_text(1) == "converges ≈ step 3 · ETA 0:04 · run ends 3:18"


def test_format_duration():
    assert format_duration(None) == "?"
    assert format_duration(float("inf")) == "?"
    assert format_duration(59.6) == "1:00"
    assert format_duration(3 * 3600 + 62) == "3:01:02"
