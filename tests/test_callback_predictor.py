"""TrainingTimePredictor with a real Trainer on CPU (both Lightning namespaces)."""

from __future__ import annotations

import copy
import csv
import glob
import json
import os
import random
import time
import warnings

import numpy as np
import pytest
import pytorch_lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import lightning_ttp
from lightning_ttp.callbacks import TrainingTimePredictor
from lightning_ttp.callbacks import predictor as predictor_module
from lightning_ttp.callbacks._trainer_state import kernel_sharding, unsupported_strategy
from lightning_ttp.dynamics import epsilon_training_time, smooth_curve
from lightning_ttp.pipeline.closed_loop.loop import checkpoint_steps
from lightning_ttp.pipeline.run_state import refit_steps, relinearisation_steps
from tests.conftest import GLOO_EXIT_ABORT

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def _ns(name: str):
    import importlib

    return importlib.import_module(name)


def _data(n: int = 64, d: int = 6, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, c, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, c, generator=g)).argmax(1)
    return x, y


def _module(ns: str, *, lr: float = 0.3, momentum: float = 0.0, dropout: float = 0.0, scheduler=None,
            dict_batch: bool = False):
    pl = _ns(ns)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))
            self.seen_lrs: list[float] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = (batch["features"], batch["label"]) if dict_batch else batch
            self.seen_lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)
            if scheduler is None:
                return opt
            sched, interval = scheduler
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched(opt), "interval": interval}}

    return Net()


def _trainer(ns: str, tmp_path, **kwargs):
    pl = _ns(ns)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _quiet_predictor(**kwargs) -> TrainingTimePredictor:
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("plot", False)
    return TrainingTimePredictor(**kwargs)


# ----------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilons": (0.0,)}, "epsilons"),
        ({"epsilons": ()}, "epsilons"),
        ({"num_samples": 1}, "num_samples"),
        ({"steps": 0}, "steps"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"num_paths": 0}, "num_paths"),
        ({"what_if": {"learning_rate": [0.1]}}, "what_if key"),
        ({"what_if": {"lr": []}}, "empty"),
        ({"what_if": {"momentum": [1.5]}}, "momentum"),
        ({"refine_every": 0}, "refine_every"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingTimePredictor(**kwargs)
    with pytest.raises(TypeError, match="output_fn"):
        TrainingTimePredictor(output_fn=3)


def test_isinstance_of_both_namespaces_and_unique_state_key():
    cb = TrainingTimePredictor()
    for ns in NAMESPACES:
        assert isinstance(cb, _ns(ns).Callback)
    assert cb.prediction is None
    assert cb.state_key != TrainingTimePredictor(seed=1).state_key
    assert "TrainingTimePredictor" in cb.state_key


def test_fsdp_and_deepspeed_are_refused_with_a_reason():
    strategies = _ns("pytorch_lightning").strategies

    # instances of Lightning's own classes, without their (device-probing) constructors
    def FSDPStrategy():  # noqa: N802
        return object.__new__(strategies.FSDPStrategy)

    def DeepSpeedStrategy():  # noqa: N802
        return object.__new__(strategies.DeepSpeedStrategy)

    def DDPStrategy():  # noqa: N802
        return object.__new__(strategies.DDPStrategy)

    class FakeTrainer:
        def __init__(self, strategy):
            self.strategy = strategy

    assert "shards" in unsupported_strategy(FakeTrainer(FSDPStrategy()))
    assert "shards" in unsupported_strategy(FakeTrainer(DeepSpeedStrategy()))
    assert unsupported_strategy(FakeTrainer(DDPStrategy())) is None
    # the kernel is never split under a strategy that shards the parameters (DeepSpeed subclasses DDP)
    for strategy in (FSDPStrategy(), DeepSpeedStrategy()):
        trainer = FakeTrainer(strategy)
        trainer.world_size, trainer.global_rank = 2, 0
        assert kernel_sharding(trainer) is None
    # the callback refuses (warns once, disables itself) or, with strict=True, raises
    cb = TrainingTimePredictor()
    with pytest.warns(UserWarning, match="disabled.*FSDPStrategy"):
        cb.setup(FakeTrainer(FSDPStrategy()), None, "fit")
    cb.on_fit_start(FakeTrainer(FSDPStrategy()), None)  # returns at once: nothing computed
    assert cb.prediction is None
    with pytest.raises(RuntimeError, match="cannot run.*DeepSpeed"):
        TrainingTimePredictor(strict=True).setup(FakeTrainer(DeepSpeedStrategy()), None, "fit")


# ----------------------------------------------------------------------------- end to end


def _read_csv(log_dir: str) -> list[dict[str, str]]:
    (path,) = glob.glob(os.path.join(log_dir, "**", "metrics.csv"), recursive=True)
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("ns", NAMESPACES)
def test_end_to_end_matches_predict_training_time_and_logs_the_curve(ns, tmp_path):
    pl = _ns(ns)
    x, y = _data()
    module = _module(ns)
    initial = copy.deepcopy(module.net)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)  # full batch: the GD prediction
    cb = _quiet_predictor(num_samples=64, plot=True)
    loggers = [pl.loggers.CSVLogger(str(tmp_path)), pl.loggers.TensorBoardLogger(str(tmp_path / "tb"))]
    trainer = _trainer(ns, tmp_path, max_steps=30, callbacks=[cb], logger=loggers, log_every_n_steps=5)
    trainer.fit(module, loader)

    pred = cb.prediction
    assert pred is not None
    assert len(pred.loss) == 31 and cb.planned_steps == 30
    # the callback's prediction is the engine's prediction for the same model, data, optimiser
    reference = lightning_ttp.predict_training_time(
        initial, (x, y), torch.optim.SGD(initial.parameters(), lr=0.3), 30, loss="cross_entropy"
    )
    np.testing.assert_allclose(pred.loss, reference.loss, rtol=1e-4)
    # the prediction is a prediction of *this* run: starts at the real initial loss
    assert pred.loss[0] == pytest.approx(cb.observed_losses[0], rel=1e-4)

    rows = _read_csv(str(tmp_path))
    curve = {int(r["step"]): float(r["ttp/predicted_loss"]) for r in rows if r.get("ttp/predicted_loss")}
    assert sorted(curve) == list(range(31))
    np.testing.assert_allclose([curve[s] for s in range(31)], pred.loss, rtol=1e-6)
    assert any(r.get("ttp/predicted_error") for r in rows)
    progress = [r for r in rows if r.get("ttp/steps_to_converge_eps0.1")]
    assert len(progress) == 30 // 5  # every log_every_n_steps optimiser steps
    assert all(r.get("ttp/steps_to_converge_eps0.01") for r in progress)
    assert any(r.get("ttp/eta_end_seconds") for r in progress)  # once step times are known
    assert os.path.exists(cb.plot_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents*"), recursive=True)
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    assert "ttp/predicted_vs_real" in accumulator.Tags()["images"]
    assert len(accumulator.Scalars("ttp/predicted_loss")) == 31
    assert cb.real_training_time(0.1) is not None


@pytest.mark.parametrize("ns", NAMESPACES)
def test_prediction_leaves_training_bit_identical(ns, tmp_path):
    """Model weights/mode, RNG streams (dropout, shuffling) and optimiser: unchanged."""
    x, y = _data()

    def run(with_predictor: bool):
        pl = _ns(ns)
        pl.seed_everything(3, verbose=False)
        module = _module(ns, dropout=0.2, momentum=0.9)
        module.net[2].eval()  # a submodule in eval mode must stay so
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        # an unlimited re-linearisation budget: the closed loop runs inside the fit too
        cbs = [_quiet_predictor(num_samples=32, relinearise_budget=1e3)] if with_predictor else []
        trainer = _trainer(ns, tmp_path, max_steps=30, callbacks=cbs)
        trainer.fit(module, loader)
        return module, (torch.rand(1).item(), np.random.rand(), random.random()), cbs  # noqa: NPY002

    plain, rng_plain, _ = run(False)
    with_cb, rng_cb, cbs = run(True)
    assert cbs[0].prediction is not None and cbs[0].state.live_step == 12
    for a, b in zip(plain.parameters(), with_cb.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rng_plain == rng_cb
    assert not with_cb.net[2].training


def test_resume_restores_without_recompute(tmp_path, monkeypatch):
    ns = "pytorch_lightning"
    pl = _ns(ns)
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    cb = _quiet_predictor(num_samples=32)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    trainer = _trainer(ns, tmp_path, max_steps=8, callbacks=[cb, ckpt], enable_checkpointing=True)
    trainer.fit(_module(ns), loader)
    first = cb.prediction.to_dict()

    calls = []
    real_predict = predictor_module.predict_run
    monkeypatch.setattr(predictor_module, "predict_run", lambda *a, **k: calls.append(1) or real_predict(*a, **k))
    resumed = _quiet_predictor(num_samples=32)
    trainer = _trainer(ns, tmp_path, max_steps=16, callbacks=[resumed], enable_checkpointing=True)
    trainer.fit(_module(ns), loader, ckpt_path=os.path.join(str(tmp_path), "last.ckpt"))
    assert calls == []
    assert json.dumps(resumed.prediction.to_dict(), sort_keys=True) == json.dumps(first, sort_keys=True)
    assert len(resumed.observed_losses) == 16  # 8 restored + 8 observed after the resume


def test_reused_callback_recomputes_for_a_second_fit(tmp_path):
    """Only a checkpoint restore keeps a prediction; a second fit with the same callback
    object (different lr and length) gets its own prediction."""
    ns = "pytorch_lightning"
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    cb = _quiet_predictor(num_samples=32, refine=False)
    _trainer(ns, tmp_path, max_steps=8, callbacks=[cb]).fit(_module(ns, lr=0.3), loader)
    first = np.asarray(cb.prediction.loss)
    assert first.size == 9 and len(cb.observed_losses) == 8
    _trainer(ns, tmp_path, max_steps=20, callbacks=[cb]).fit(_module(ns, lr=0.01), loader)
    second = np.asarray(cb.prediction.loss)
    assert second.size == 21 and cb.planned_steps == 20
    assert second[8] > first[8]  # a 30x smaller learning rate decreases the loss more slowly
    assert len(cb.observed_losses) == 20  # this fit's losses only
    np.testing.assert_allclose(cb.lr_schedule, 0.01)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_gradient_accumulation_means_a_larger_batch(ns, tmp_path):
    x, y = _data(n=64)

    def predict(batch_size: int, accumulate: int):
        cb = _quiet_predictor(num_samples=64, refine=False)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
        trainer = _trainer(ns, tmp_path, max_steps=6, accumulate_grad_batches=accumulate, callbacks=[cb])
        trainer.fit(_module(ns), loader)
        return cb

    accumulated = predict(8, 2)
    large = predict(16, 1)
    small = predict(8, 1)
    assert accumulated.plan["effective_batch_size"] == 16 == large.plan["effective_batch_size"]
    np.testing.assert_allclose(accumulated.prediction.loss, large.prediction.loss, rtol=1e-10)
    assert not np.allclose(accumulated.prediction.loss, small.prediction.loss)
    # the observed loss of an accumulated step is the mean over its micro-batches, not 1/k of it
    assert accumulated.observed_losses[0] == pytest.approx(accumulated.prediction.loss[0], rel=0.5)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_lr_scheduler_is_followed_exactly(interval, tmp_path):
    ns = "lightning.pytorch"
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 4 steps per epoch
    step_size = 3 if interval == "step" else 1

    def sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.1)

    module = _module(ns, scheduler=(sched, interval))
    cb = _quiet_predictor(num_samples=64, refine=False)
    trainer = _trainer(ns, tmp_path, max_steps=10, callbacks=[cb])
    trainer.fit(module, loader)
    # the per-step learning rates the prediction used are the ones Lightning really applied
    assert len(module.seen_lrs) == 10
    np.testing.assert_allclose(cb.lr_schedule[:, 0], module.seen_lrs, rtol=1e-12)
    assert len(set(module.seen_lrs)) > 1
    # the user's scheduler and optimiser were not stepped by the prediction
    assert module.trainer.lr_scheduler_configs[0].scheduler.last_epoch == (10 if interval == "step" else 2)
    # a decaying schedule slows the predicted decrease compared with a constant lr
    constant = _quiet_predictor(num_samples=64, refine=False)
    _trainer(ns, tmp_path, max_steps=10, callbacks=[constant]).fit(_module(ns), loader)
    assert cb.prediction.loss[-1] > constant.prediction.loss[-1]


# ----------------------------------------------------------------------------- data shapes


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


def test_iterable_dataset_without_validation(tmp_path):
    ns = "pytorch_lightning"
    x, y = _data()
    loader = DataLoader(_Stream(x, y), batch_size=16)
    cb = _quiet_predictor(num_samples=40)
    trainer = _trainer(ns, tmp_path, max_steps=12, callbacks=[cb], limit_val_batches=0)
    trainer.fit(_module(ns), loader)
    assert cb.prediction is not None and cb.plan["iterable"] and cb.plan["num_samples"] == 40
    assert cb.planned_steps == 12


def test_dict_batch_with_output_fn(tmp_path):
    ns = "lightning.pytorch"
    x, y = _data()
    dicts = [{"features": a, "label": b} for a, b in zip(x, y)]
    loader = DataLoader(dicts, batch_size=16)
    cb = _quiet_predictor(
        num_samples=32,
        output_fn=lambda module, batch: module(batch["features"]),
        target_fn=lambda batch: batch["label"],
    )
    trainer = _trainer(ns, tmp_path, max_steps=6, callbacks=[cb])
    trainer.fit(_module(ns, dict_batch=True), loader)
    assert cb.prediction is not None and cb.plan["num_samples"] == 32


def test_dict_batch_without_output_fn_names_the_options(tmp_path):
    ns = "lightning.pytorch"
    x, y = _data()
    loader = DataLoader([{"features": a, "label": b} for a, b in zip(x, y)], batch_size=16)
    trainer = _trainer(ns, tmp_path, max_steps=2, callbacks=[_quiet_predictor(strict=True)])
    with pytest.raises(TypeError, match="output_fn=.*target_fn"):
        trainer.fit(_module(ns, dict_batch=True), loader)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_failing_output_fn_warns_once_and_training_completes(ns, tmp_path):
    x, y = _data()

    def broken(module, batch):
        raise RuntimeError("deliberately broken output_fn")

    cb = _quiet_predictor(output_fn=broken)
    trainer = _trainer(ns, tmp_path, max_steps=5, callbacks=[cb])
    with pytest.warns(UserWarning, match="deliberately broken output_fn") as record:
        trainer.fit(_module(ns), DataLoader(TensorDataset(x, y), batch_size=16))
    assert trainer.global_step == 5
    assert cb.prediction is None and cb.status_text(3) is None
    assert sum("lightning_ttp" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("ns", NAMESPACES)
def test_failing_logger_warns_once_and_training_completes(ns, tmp_path):
    pl = _ns(ns)

    class BrokenLogger(pl.loggers.CSVLogger):
        def log_metrics(self, metrics, step=None):
            raise RuntimeError("deliberately broken logger")

    x, y = _data()
    cb = _quiet_predictor(num_samples=32, verbose=True)  # the summaries are printed too
    trainer = _trainer(ns, tmp_path, max_steps=5, log_every_n_steps=1, callbacks=[cb],
                       logger=BrokenLogger(str(tmp_path)))
    with pytest.warns(UserWarning, match="deliberately broken logger") as record:
        trainer.fit(_module(ns), DataLoader(TensorDataset(x, y), batch_size=16))
    assert trainer.global_step == 5
    assert cb.prediction is not None and len(cb.observed_losses) == 5
    assert sum("lightning_ttp" in str(w.message) for w in record) == 1


def test_state_dict_never_hides_an_error():
    """A checkpoint that silently lost the prediction would be recomputed from trained weights on
    resume: saving raises instead (Lightning then fails the save loudly)."""

    class Broken:
        def to_dict(self):
            raise RuntimeError("deliberately broken to_dict")

    cb = _quiet_predictor()
    cb.state.prediction = Broken()
    with pytest.raises(RuntimeError, match="deliberately broken to_dict"):
        cb.state_dict()


def test_load_state_dict_reads_its_keys_strictly():
    cb = _quiet_predictor()
    state = cb.state_dict()
    cb.load_state_dict(state)
    del state["plan"]
    with pytest.raises(KeyError, match="missing \\['plan'\\]"):
        _quiet_predictor().load_state_dict(state)


def test_strict_raises(tmp_path):
    x, y = _data()
    cb = _quiet_predictor(output_fn=lambda m, b: (_ for _ in ()).throw(ValueError("nope")), strict=True)
    trainer = _trainer("pytorch_lightning", tmp_path, max_steps=2, callbacks=[cb])
    with pytest.raises(ValueError, match="nope"):
        trainer.fit(_module("pytorch_lightning"), DataLoader(TensorDataset(x, y), batch_size=16))


def test_what_if_reuses_the_kernel(tmp_path):
    x, y = _data()
    cb = _quiet_predictor(
        num_samples=64, what_if={"lr": [0.03, 3.0, 1e6], "momentum": [0.9], "batch_size": [64]}
    )
    trainer = _trainer("pytorch_lightning", tmp_path, max_steps=20, callbacks=[cb])
    trainer.fit(_module("pytorch_lightning"), DataLoader(TensorDataset(x, y), batch_size=16))
    rows = {r["setting"]: r for r in cb.what_if_table}
    assert set(rows) == {"lr=0.03", "lr=3", "lr=1e+06", "momentum=0.9", "batch_size=64"}
    # a diverging setting is reported as never converging, not as a crash
    assert all(steps is None for steps in rows["lr=1e+06"]["steps_to_converge"].values())
    assert "never" in cb.what_if_text()
    # a 10x smaller learning rate converges later (or never within the run)
    slow = rows["lr=0.03"]["final_loss"]
    assert slow > cb.prediction.loss[-1]
    assert "what-if" in cb.what_if_text()


# ----------------------------------------------------------------------------- distributed


class _DDPNet(pytorch_lightning.LightningModule):
    """Module level: ddp_spawn pickles the module into the worker processes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


class _RecordingPredictor(TrainingTimePredictor):
    """Writes each rank's prediction, its kernels' shards and (rank zero) the pipeline's arguments to
    files (ddp_spawn runs the fit in child processes)."""

    def __init__(self, out_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self._engine = None

    def _file(self, trainer, name):
        return os.path.join(self.out_dir, f"{name}_rank{trainer.global_rank}")

    def on_fit_start(self, trainer, pl_module):
        import lightning_ttp.kernel as kernel_module

        real_predict, real_ntk = predictor_module.predict_run, kernel_module.empirical_ntk

        def counting_predict(*args, **kwargs):
            with open(self._file(trainer, "predict_calls") + ".txt", "a") as fh:
                fh.write("1\n")
            if trainer.is_global_zero:  # what a one-process predict_run needs to redo this prediction
                torch.save({"subset": args[1], "plan": args[3],
                            "kwargs": {k: v for k, v in kwargs.items() if k != "sharding"}},
                           os.path.join(self.out_dir, "predict_args.pt"))
            return real_predict(*args, **kwargs)

        def recording_ntk(*args, **kwargs):  # every kernel of the fit: fit start, look-ahead, closed loop
            ntk = real_ntk(*args, **kwargs)
            with open(self._file(trainer, "kernels") + ".txt", "a") as fh:
                fh.write(f"{ntk.num_samples} {ntk.world_size} {ntk.shard[0]} {ntk.shard[1]}\n")
            return ntk

        self._engine = (kernel_module, real_ntk)
        kernel_module.empirical_ntk = recording_ntk
        predictor_module.predict_run = counting_predict
        try:
            super().on_fit_start(trainer, pl_module)
        finally:
            predictor_module.predict_run = real_predict

    def on_train_end(self, trainer, pl_module):
        module, real_ntk = self._engine
        module.empirical_ntk = real_ntk
        with open(self._file(trainer, "prediction") + ".json", "w") as fh:
            json.dump({"prediction": None if self.prediction is None else self.prediction.to_dict(),
                       "live_loss": self.state.live_loss, "live_step": self.state.live_step}, fh)


@GLOO_EXIT_ABORT
def test_ddp_spawn_two_processes_share_the_kernel_and_predict_alike(tmp_path):
    """Under ddp_spawn the kernel subset is split across the 2 ranks at fit start, in the
    look-ahead and in the closed loop; both ranks hold the same prediction, equal to a
    one-process ``predict_run`` on the same subset and plan (relative 1e-6)."""
    ns = "pytorch_lightning"
    pl = _ns(ns)
    x, y = _data()
    cb = _RecordingPredictor(str(tmp_path), num_samples=32, verbose=False, plot=False, warmup_steps=0,
                             relinearise_budget=1e6)
    trainer = _trainer(
        ns,
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=40,
        callbacks=[cb],
        logger=pl.loggers.CSVLogger(str(tmp_path)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_DDPNet(), DataLoader(TensorDataset(x, y), batch_size=8))
    ranks = []
    for r in (0, 1):
        with open(tmp_path / f"prediction_rank{r}.json") as fh:
            ranks.append(json.load(fh))
    assert ranks[0]["prediction"] is not None and ranks[0] == ranks[1]
    assert ranks[0]["live_step"] is not None  # the closed loop ran, on both ranks alike
    # every rank predicted once, and every kernel (fit start, look-ahead, closed loop) was split in halves
    for r in (0, 1):
        assert (tmp_path / f"predict_calls_rank{r}.txt").read_text() == "1\n"
        kernels = [line.split() for line in (tmp_path / f"kernels_rank{r}.txt").read_text().splitlines()]
        assert len(kernels) >= 3, kernels
        assert all(k == ["32", "2", str(16 * r), str(16 * (r + 1))] for k in kernels), kernels
    assert ranks[0]["prediction"]["diagnostics"]["extra"]["processes"] == 2
    # the same prediction from one process on the same subset and plan
    args = torch.load(tmp_path / "predict_args.pt", weights_only=False)
    model = _DDPNet()
    alone = lightning_ttp.api.predict_run(model, args["subset"], torch.optim.SGD(model.parameters(), lr=0.3),
                                          args["plan"], **args["kwargs"]).prediction
    sharded = np.asarray(ranks[0]["prediction"]["loss"])
    assert np.allclose(sharded, alone.loss, rtol=1e-6, atol=0), np.abs(sharded / alone.loss - 1).max()
    rows = _read_csv(str(tmp_path))
    logged = [r for r in rows if r.get("ttp/predicted_loss")]
    assert len(logged) == 41  # steps 0..40, written once (rank zero), not once per rank


@pytest.mark.parametrize("ns", NAMESPACES)
def test_linear_model_full_batch_observed_equals_predicted(ns, tmp_path):
    """A model linear in its parameters, GD with momentum and a step schedule, the full batch
    split in two accumulated micro-batches: the callback's observed per-step losses must be
    the predicted curve itself (checks step alignment, loss scaling, schedule, refinement)."""
    pl = _ns(ns)
    x, y = _data(n=64)

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(6, 3)

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return nn.functional.cross_entropy(self(inputs), targets)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.5)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    cb = _quiet_predictor(num_samples=64, refine_every=4)
    trainer = _trainer(ns, tmp_path, max_steps=12, accumulate_grad_batches=2, callbacks=[cb])
    trainer.fit(Linear(), DataLoader(TensorDataset(x, y), batch_size=32))
    assert cb.plan["effective_batch_size"] == 64 and cb.prediction.diagnostics["full_batch"]
    np.testing.assert_allclose(cb.observed_losses, cb.prediction.loss[:12], rtol=1e-4)
    assert cb.refinement is not None and cb.refinement.warp == pytest.approx(1.0, abs=0.02)
    assert cb.real_training_time(0.1) == cb.prediction.training_time(0.1)


class _PreBatched(IterableDataset):
    """Yields whole batches (DataLoader(batch_size=None)): the batch size is read from the data."""

    def __init__(self, x, y, batch: int):
        self.x, self.y, self.batch = x, y, batch

    def __iter__(self):
        for i in range(0, len(self.x), self.batch):
            yield self.x[i : i + self.batch], self.y[i : i + self.batch]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_pre_batched_iterable_reads_the_batch_size_from_the_data(ns, tmp_path):
    x, y = _data()
    cb = _quiet_predictor(num_samples=32, refine=False)
    trainer = _trainer(ns, tmp_path, max_steps=4, callbacks=[cb])
    trainer.fit(_module(ns), DataLoader(_PreBatched(x, y, 16), batch_size=None))
    assert cb.prediction is not None
    assert cb.plan["batch_size"] == 16 and cb.plan["num_samples"] == 32


@pytest.mark.parametrize("ns", NAMESPACES)
def test_pre_batched_iterable_leaves_training_bit_identical(ns, tmp_path):
    """Reading the batch size from the first batch of a batch_size=None loader must not advance
    the global RNG (the loader draws its base seed from it): dropout masks stay the same."""
    x, y = _data()

    def run(with_predictor: bool):
        _ns(ns).seed_everything(3, verbose=False)
        module = _module(ns, dropout=0.3)
        cbs = [_quiet_predictor(num_samples=32, refine=False)] if with_predictor else []
        trainer = _trainer(ns, tmp_path, max_steps=8, callbacks=cbs)
        trainer.fit(module, DataLoader(_PreBatched(x, y, 16), batch_size=None))
        return module, (torch.rand(1).item(), np.random.rand(), random.random()), cbs  # noqa: NPY002

    plain, rng_plain, _ = run(False)
    with_cb, rng_cb, cbs = run(True)
    assert cbs[0].prediction is not None and cbs[0].plan["batch_size"] == 16
    for a, b in zip(plain.parameters(), with_cb.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rng_plain == rng_cb


def test_datamodule_loader_is_loaded_once(tmp_path):
    ns = "lightning.pytorch"
    pl = _ns(ns)
    x, y = _data()

    class Data(pl.LightningDataModule):
        calls = 0

        def train_dataloader(self):
            Data.calls += 1
            return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    cb = _quiet_predictor(num_samples=32)
    trainer = _trainer(ns, tmp_path, max_steps=6, callbacks=[cb])
    trainer.fit(_module(ns), datamodule=Data())
    assert cb.prediction is not None and cb.plan["dataset_size"] == 64
    assert Data.calls == 1  # the predictor's loader is the one Lightning trains with


def test_stability_diagnostics_describe_the_run_not_the_continuation(tmp_path):
    x, y = _data()
    cb = _quiet_predictor(num_samples=64)
    trainer = _trainer("pytorch_lightning", tmp_path, max_steps=10, callbacks=[cb])
    with pytest.warns(UserWarning, match="10 of 10 steps exceed"):
        trainer.fit(_module("pytorch_lightning", lr=50.0), DataLoader(TensorDataset(x, y), batch_size=64))
    diagnostics = cb.prediction.diagnostics
    assert diagnostics["unstable_steps"] == 10 and diagnostics["simulated_steps"] == 20
    assert any("10 of 10 steps" in w for w in diagnostics["warnings"])


def test_closed_loop_relinearises_within_its_budget_and_survives_a_checkpoint(tmp_path):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)  # full batch: every step is the real GD step
    free = _quiet_predictor(num_samples=64, relinearise_budget=1e3)
    _trainer("pytorch_lightning", tmp_path, max_steps=100, callbacks=[free]).fit(_module("pytorch_lightning"), loader)
    state = free.state
    assert state.live_step == 40 and len(state.live_loss) == 101 and state.live_seconds > 0
    # before the re-linearisation step the live curve is the observed (full-batch, unsmoothed) loss
    np.testing.assert_allclose(state.live_loss[:40], free.observed_losses[:40], rtol=1e-12)
    assert free.converge_step(0.1) == epsilon_training_time(free.current_curve(), 0.1)
    restored = _quiet_predictor(num_samples=64)
    restored.load_state_dict(free.state_dict())
    assert restored.state.live_loss == state.live_loss and restored.converge_step(0.1) == free.converge_step(0.1)

    # no share of the run: the loop may still spend what the fit-start prediction counted, so the
    # first call (at 3 % of this run) is made however short the run, and its total count stays within that
    none = _quiet_predictor(num_samples=64, relinearise_budget=0.0)
    _trainer("pytorch_lightning", tmp_path, max_steps=100, callbacks=[none]).fit(_module("pytorch_lightning"), loader)
    counts = none.prediction.diagnostics["budget"]
    made = relinearisation_steps(checkpoint_steps(100), counts, 100, 0.0)
    assert none.state.live_step == made[-1]
    off = _quiet_predictor(num_samples=64, refine=False)
    _trainer("pytorch_lightning", tmp_path, max_steps=100, callbacks=[off]).fit(_module("pytorch_lightning"), loader)
    assert off.state.live_step is None and off.state.live_seconds == 0.0


def test_closed_loop_smooths_mini_batch_losses_against_the_fit_start_curve(tmp_path):
    """Mini-batches (4 per epoch, smoothing width 5): before the re-linearisation step the live curve
    is the fit-start curve P plus the moving average of the losses' differences from it."""
    x, y = _data()
    cb = _quiet_predictor(num_samples=64, relinearise_budget=1e3)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    _trainer("pytorch_lightning", tmp_path, max_steps=100, callbacks=[cb]).fit(_module("pytorch_lightning"), loader)
    k, observed, p = cb.state.live_step, np.asarray(cb.observed_losses), cb.prediction.loss
    expected = p[:k] + smooth_curve(observed[:k] - p[:k], 5, degree=0)
    np.testing.assert_allclose(cb.state.live_loss[:k], expected, rtol=1e-12)
    assert not np.allclose(cb.state.live_loss[:k], smooth_curve(observed[:k], 5))


def test_the_closed_loop_makes_the_same_calls_at_any_machine_load(tmp_path, monkeypatch):
    # the calls are chosen from counts at fit start: a clock gone wild changes none of them; the
    # refits at the fixed fractions of the run start afresh, so the periodic ones (which the clock
    # gates) change none of the live curves read there, nor the final one
    import lightning.pytorch as pl

    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    runs, calls = [], iter(range(10**9))

    class Reader(pl.Callback):
        def __init__(self, predictor):
            self.predictor, self.read = predictor, []

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in refit_steps(60):
                self.read.append((self.predictor.converge_step(0.1), self.predictor.current_curve().tobytes()))

    for wild in (False, True):
        if wild:
            monkeypatch.setattr(time, "perf_counter", lambda: next(calls) * 7.3)
        # a periodic refit after every step in one run, none in the other
        predictor = _quiet_predictor(num_samples=48, refine_every=10**6 if wild else 1, refine_budget=1.0)
        reader = Reader(predictor)
        _trainer("lightning.pytorch", tmp_path, max_steps=60, callbacks=[predictor, reader]).fit(
            _module("lightning.pytorch"), loader)
        runs.append((predictor.state.live_step, np.asarray(predictor.state.live_loss).tobytes(), reader.read,
                     predictor.converge_step(0.1), predictor.current_curve().tobytes()))
    assert runs[0][0] is not None and len(runs[0][2]) == len(refit_steps(60)) and runs[0] == runs[1]


def test_the_live_curve_refit_follows_a_faster_run_past_the_end_instead_of_a_flat_tail():
    # a run 1.5x faster than the live curve: the time-warped refit reads the curve beyond T, where
    # the open loop's continuation (joined at T) goes on falling; a live curve cut at T would be
    # held flat there and converge too early
    from lightning_ttp import Prediction
    from lightning_ttp.callbacks.predictor import PredictorState

    steps = np.arange(101)
    curve = 0.2 + np.exp(-steps / 60.0)
    continuation = 0.2 + np.exp(-np.arange(101, 201) / 60.0)
    predictor = _quiet_predictor()
    predictor.state = PredictorState(prediction=Prediction(steps, curve, continuation=continuation))
    predictor.state.live_loss, predictor.state.live_step = curve.tolist(), 5
    predictor.state.observed_losses = (0.2 + np.exp(-1.5 * np.arange(40) / 60.0)).tolist()
    predictor._refine_now()
    refit = predictor.state.refinement
    assert refit.warp == pytest.approx(1.5, rel=0.1)
    np.testing.assert_allclose(refit.loss[-1], 0.2 + np.exp(-150 / 60.0), rtol=0.02)  # read past T
    assert refit.loss[-1] < refit.loss[80] - 0.01  # still falling at the end, not held flat
