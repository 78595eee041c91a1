"""EarlyGiveUp in real Trainers of both Lightning namespaces (small digits MLPs, CPU)."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import tempfile
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ttp.callbacks import EarlyGiveUp
from lightning_ttp.spectral import SpectralConfig, compute_scores
from tests.conftest import GLOO_EXIT_ABORT

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def _data(n_train: int = 480, n_val: int = 160):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    return (x[:n_train], y[:n_train]), (x[n_train : n_train + n_val], y[n_train : n_train + n_val])


TRAIN, VAL = _data()


def _module_class(ns: str) -> type:
    pl = importlib.import_module(ns)

    class MLP(pl.LightningModule):
        def __init__(self, init: str = "healthy") -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)
            )
            with torch.no_grad():
                if init == "dead":  # every first-layer unit is negative on every input: no gradient flows
                    self.net[0].weight.mul_(0.01)
                    self.net[0].bias.fill_(-10.0)
                elif init == "nan":
                    self.net[0].weight.fill_(float("nan"))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            out = self(batch[0])
            self.log("val_acc", (out.argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    # module-level name so that ddp_spawn can pickle it
    MLP.__name__ = MLP.__qualname__ = "MLP_" + ns.replace(".", "_")
    return MLP


MLP_pytorch_lightning = _module_class("pytorch_lightning")
MLP_lightning_pytorch = _module_class("lightning.pytorch")


def make_module(ns: str, init: str = "healthy"):
    cls = MLP_pytorch_lightning if ns == "pytorch_lightning" else MLP_lightning_pytorch
    return cls(init)


def loaders(val: bool = True, val_x: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(*TRAIN), batch_size=48, shuffle=True, generator=g)
    if not val:
        return train, None
    vx = VAL[0] if val_x is None else val_x
    return train, DataLoader(TensorDataset(vx, VAL[1]), batch_size=64)


def trainer(ns: str, callbacks, max_epochs: int, **kw):
    pl = importlib.import_module(ns)
    opts = dict(
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tempfile.mkdtemp(prefix="ttp-give-up-"),  # the give-up plot goes there, not into cwd
    )
    opts.update(kw)
    return pl.Trainer(**opts)


def fit(ns: str, cb: EarlyGiveUp, init: str = "healthy", max_epochs: int = 7, val: bool = True, **kw):
    torch.manual_seed(0)
    model = make_module(ns, init)
    t = trainer(ns, [cb], max_epochs, **kw)
    train, vl = loaders(val)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        t.fit(model, train, vl)
    return t, model


@pytest.mark.parametrize("ns", NAMESPACES)
def test_dead_init_is_stopped_at_the_checkpoint_and_healthy_is_not(ns, caplog):
    cb = EarlyGiveUp(checkpoint_epoch=3)
    with caplog.at_level(logging.INFO):
        t, _ = fit(ns, cb, "dead", max_epochs=6)
    assert cb.gave_up and cb.decision is not None and cb.decision.kind in ("dead", "saturated")
    assert t.current_epoch == 3  # stopped after the 3rd epoch, not at max_epochs=6
    assert cb.reason and cb.reason in caplog.text
    assert [h["epoch"] for h in cb.history] == [1, 2, 3]

    healthy = EarlyGiveUp(checkpoint_epoch=3)
    t, _ = fit(ns, healthy, "healthy", max_epochs=4)
    assert not healthy.gave_up and healthy.decision.kind == "continue"
    assert t.current_epoch == 4 and len(healthy.history) == 4
    assert "give_up/s_F" in t.callback_metrics and "give_up/s_o" in t.callback_metrics
    # the healthy run's accuracy was computed by the callback and enters s_Fv
    last = healthy.history[-1]
    assert last["v_t"] > 0.6 and math.isfinite(last["s_Fv"])  # a dead init stays at ~0.1
    assert float(t.callback_metrics["give_up/v_t"]) == pytest.approx(last["v_t"], abs=1e-6)


def test_callback_is_an_instance_of_both_namespaces():
    for ns in NAMESPACES:
        assert isinstance(EarlyGiveUp(), importlib.import_module(ns).Callback)


def test_warn_mode_only_logs_and_hook_fires(capsys):
    seen = []
    cb = EarlyGiveUp(checkpoint_epoch=2, mode="warn", on_give_up=lambda tr, m, d: seen.append(d.kind))
    t, _ = fit("pytorch_lightning", cb, "dead", max_epochs=4)
    assert cb.gave_up and seen == [cb.decision.kind]
    assert t.current_epoch == 4  # not stopped


def test_min_epochs_is_respected():
    cb = EarlyGiveUp(checkpoint_epoch=2)
    t, _ = fit("pytorch_lightning", cb, "dead", max_epochs=6, min_epochs=4)
    assert cb.gave_up and t.current_epoch == 4


def test_user_accuracy_metric_is_used():
    cb = EarlyGiveUp(checkpoint_epoch=3, accuracy_metric="val_acc")
    t, _ = fit("lightning.pytorch", cb, "healthy", max_epochs=3)
    assert cb.history[-1]["v_t"] == pytest.approx(float(t.callback_metrics["val_acc"]), abs=1e-6)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_resume_keeps_history(ns, tmp_path):
    pl = importlib.import_module(ns)
    cfg = SpectralConfig(t0=3)
    cb = EarlyGiveUp(checkpoint_epoch=50, config=cfg)
    torch.manual_seed(0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    t = trainer(ns, [cb, ckpt], 3, enable_checkpointing=True)
    train, vl = loaders()
    t.fit(make_module(ns), train, vl)
    first = [dict(h) for h in cb.history]
    assert len(first) == 3

    resumed = EarlyGiveUp(checkpoint_epoch=50, config=cfg)
    ckpt2 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    t2 = trainer(ns, [resumed, ckpt2], 5, enable_checkpointing=True)
    t2.fit(make_module(ns), *loaders(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    assert repr(resumed.history[:3]) == repr(first)  # NaN-aware equality
    # the window of eq. (2)/(4) spans the resume: round 4 already sees 4 spectra (t0 + 1 = 4)
    assert resumed.history[3]["rounds"] == 4
    assert resumed.state_key == cb.state_key
    assert EarlyGiveUp(checkpoint_epoch=5).state_key != EarlyGiveUp(checkpoint_epoch=6).state_key


def test_nan_activations_stop_the_run_at_once():
    """Measured: NaN weights for three rounds gave 'insufficient' and the run was never stopped.
    Non-finite activations now stop it at the first round, before the checkpoint."""
    cb = EarlyGiveUp(checkpoint_epoch=5)
    t, _ = fit("pytorch_lightning", cb, "nan", max_epochs=6)
    assert cb.gave_up and cb.decision.kind == "diverged"
    assert t.current_epoch == 1


def test_some_nan_validation_rows_are_dropped():
    vx = VAL[0].clone()
    vx[::5, 0] = float("nan")
    cb = EarlyGiveUp(checkpoint_epoch=3, mode="warn")
    torch.manual_seed(0)
    t = trainer("pytorch_lightning", [cb], 3)
    train, vl = loaders(val_x=vx)
    t.fit(make_module("pytorch_lightning"), train, vl)
    assert all(math.isfinite(h["s_o"]) for h in cb.history)
    assert math.isfinite(cb.history[-1]["s_F"])


def test_without_validation_loop_uses_training_subset():
    cb = EarlyGiveUp(checkpoint_epoch=3, num_samples=100)
    with pytest.warns(UserWarning, match="no validation loop"):
        t, _ = fit("lightning.pytorch", cb, "dead", max_epochs=6, val=False, limit_val_batches=0)
    assert len(cb.history) == 3 and cb.gave_up and t.current_epoch == 3


def test_bad_layer_name_warns_and_bad_arguments_raise():
    cb = EarlyGiveUp(layers=["net.0", "encoder.fc"])
    with pytest.warns(UserWarning, match=r"no module named \['encoder.fc'\]"):
        t, _ = fit("pytorch_lightning", cb, "healthy", max_epochs=2)
    assert t.current_epoch == 2 and cb.layers == ["net.0"]
    with pytest.raises(ValueError, match="pass 0.65, not 65"):
        EarlyGiveUp(target_accuracy=65)
    with pytest.raises(ValueError, match="'stop'"):
        EarlyGiveUp(mode="kill")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of module names"):
        EarlyGiveUp(layers="net.0")  # type: ignore[arg-type]


def test_target_rank_of_the_config_is_used():
    cb = EarlyGiveUp(checkpoint_epoch=10, config=SpectralConfig(target_rank=9))
    fit("pytorch_lightning", cb, "healthy", max_epochs=3)
    st = cb.state
    ours = compute_scores(st.spectra, 3, None, SpectralConfig(target_rank=9), st.units, st.scales)
    rank_one = compute_scores(st.spectra, 3, None, SpectralConfig(), st.units, st.scales)
    assert cb.history[-1]["s_o"] == pytest.approx(ours.s_o)
    assert ours.s_o != pytest.approx(rank_one.s_o)


def test_explicit_layers_are_monitored_post_activation_default():
    cb = EarlyGiveUp(checkpoint_epoch=10)
    fit("pytorch_lightning", cb, "healthy", max_epochs=1)
    # the ReLU after the first hidden Linear, and the head's input (= the second ReLU's output)
    assert cb.layers == ["net.1", "net.4 (input)"]
    cb = EarlyGiveUp(checkpoint_epoch=10, layers=["net.2"])
    fit("pytorch_lightning", cb, "healthy", max_epochs=1)
    assert cb.history[-1]["layers"] == 1


def test_optuna_trial_is_reported_and_pruned():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        cb = EarlyGiveUp(checkpoint_epoch=3, trial=trial)
        torch.manual_seed(0)
        frozen = _lightning_module("lightning.pytorch", nn.Sequential(
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)), lr=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer("lightning.pytorch", [cb], 5).fit(frozen, *loaders())
        return 0.0

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1)
    tr = study.trials[0]
    assert tr.state == optuna.trial.TrialState.PRUNED  # stalled at the checkpoint
    assert sorted(tr.intermediate_values) == [2, 3]  # rounds with a defined s_Fv


# ---------------------------------------------------------------- DDP
class _RecordingGiveUp(EarlyGiveUp):
    def __init__(self, out_dir: str, **kw) -> None:
        super().__init__(**kw)
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        rec = {"history": [{k: h[k] for k in ("s_o", "s_s", "s_F", "v_t", "scale")} for h in self.history]}
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(rec, f)


class _Frozen(MLP_pytorch_lightning):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the same weights on 1 and 2 processes


@GLOO_EXIT_ABORT
def test_scores_are_the_same_on_one_and_two_processes(tmp_path):
    """Measured: under ddp_spawn each rank scored its own shard (s_F 0.756 vs 0.787). The rows of the
    first num_samples validation samples are now gathered across ranks, and v_t is a synced metric."""
    runs = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        out = tmp_path / str(devices)
        out.mkdir()
        cb = _RecordingGiveUp(str(out), checkpoint_epoch=50, num_samples=100, verbose=False)
        torch.manual_seed(0)
        t = trainer("pytorch_lightning", [cb], 2, strategy=strategy, devices=devices)
        # this sandbox cannot pass tensors to spawned processes by file descriptor; file_system works
        old = torch.multiprocessing.get_sharing_strategy()
        torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t.fit(_Frozen(), *loaders())
        finally:
            torch.multiprocessing.set_sharing_strategy(old)
        runs[devices] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    one = runs[1][0]["history"]
    assert len(one) == 2 and all(math.isfinite(h["s_o"]) for h in one) and math.isfinite(one[1]["s_F"])
    for rank in runs[2]:
        for a, b in zip(rank["history"], one, strict=True):
            for key in ("s_o", "s_F", "v_t", "scale"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9, nan_ok=True), key


def test_conv_feature_maps_with_global_average_pooling():
    pl = importlib.import_module("pytorch_lightning")

    class CNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Linear(8 * 64, 10)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x.view(-1, 1, 8, 8))).flatten(1))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    cb = EarlyGiveUp(checkpoint_epoch=10, layers=["conv"], num_samples=100)
    t = trainer("pytorch_lightning", [cb], 2)
    t.fit(CNN(), *loaders())
    assert cb.state.units == [8]  # (m, C, H, W) -> (m, C)
    assert len(cb.history) == 2 and math.isfinite(cb.history[-1]["s_F"])


def test_hooks_exist_only_during_validation():
    pl = importlib.import_module("pytorch_lightning")
    seen: dict[str, list[int]] = {"train": [], "val": []}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train"].append(len(pl_module.net[1]._forward_hooks) + len(pl_module._forward_hooks))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if not trainer.sanity_checking:
                seen["val"].append(len(pl_module.net[1]._forward_hooks))

    cb = EarlyGiveUp(checkpoint_epoch=10)
    torch.manual_seed(0)
    t = trainer("pytorch_lightning", [cb, Probe()], 2)
    model = make_module("pytorch_lightning")
    t.fit(model, *loaders())
    assert seen["train"] and set(seen["train"]) == {0}
    assert seen["val"] and set(seen["val"]) == {1}
    assert len(model.net[1]._forward_hooks) == 0 and len(model._forward_hooks) == 0


def test_preserve_modes_restores_each_submodule_flag():
    from lightning_ttp.kernel.modes import preserve_modes

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.Linear(2, 1)))
    model[1].eval()
    model[2][0].eval()
    before = [m.training for m in model.modules()]
    with preserve_modes(model):
        model.eval()
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), preserve_modes(model):
        model.train()
        raise RuntimeError("restored on error too")
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("ns", NAMESPACES)
def test_frozen_batchnorm_stays_frozen_without_validation_loop(ns):
    """The training-subset forward pass (no validation loop) must give every submodule its own mode
    back: a BatchNorm the user froze in eval mode must not become trainable (nor update its stats)."""
    pl = importlib.import_module(ns)

    class FrozenBN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
            )
            self.modes: list[tuple[bool, bool]] = []

        def on_train_start(self):
            self.net[1].eval()  # frozen BatchNorm (fine-tuning)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.modes.append((self.training, self.net[1].training))
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    model = FrozenBN()
    stats = (model.net[1].running_mean.clone(), model.net[1].running_var.clone())
    cb = EarlyGiveUp(checkpoint_epoch=10, num_samples=32, verbose=False)
    train, _ = loaders(val=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(ns, [cb], 3, limit_val_batches=0).fit(model, train)
    assert len(cb.history) == 3  # the callback did run its extra forward pass every epoch
    assert len(model.modes) == 30 and all(m == (True, False) for m in model.modes)
    torch.testing.assert_close(model.net[1].running_mean, stats[0], rtol=0, atol=0)
    torch.testing.assert_close(model.net[1].running_var, stats[1], rtol=0, atol=0)
    assert int(model.net[1].num_batches_tracked) == 0


def _broken_scores(*args, **kwargs):
    raise RuntimeError("deliberately broken scores")


def test_scoring_failure_warns_once_and_training_continues(monkeypatch):
    monkeypatch.setattr("lightning_ttp.callbacks.early_give_up.compute_scores", _broken_scores)
    cb = EarlyGiveUp(checkpoint_epoch=2, verbose=False)
    with pytest.warns(UserWarning, match="deliberately broken scores") as record:
        t, _ = fit("pytorch_lightning", cb, "dead", max_epochs=4)
    assert t.current_epoch == 4  # a dead run, but no scores: not given up, training completed
    assert sum("EarlyGiveUp: scoring failed" in str(w.message) for w in record) == 1
    assert not cb.gave_up and cb.decision is None
    assert cb.history == []


def test_scoring_failure_raises_when_strict(monkeypatch):
    monkeypatch.setattr("lightning_ttp.callbacks.early_give_up.compute_scores", _broken_scores)
    with pytest.raises(RuntimeError, match="deliberately broken scores"):
        fit("pytorch_lightning", EarlyGiveUp(checkpoint_epoch=2, strict=True), "healthy", max_epochs=3)


# ---------------------------------------------------------------- regressions of issue #12
def _lightning_module(ns: str, net: nn.Module, lr: float = 3e-3, reshape=None):
    pl = importlib.import_module(ns)

    class Wrapped(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

        def forward(self, x):
            return self.model(x if reshape is None else reshape(x))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        test_step = validation_step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr) if lr == 0 else torch.optim.Adam(self.parameters(), lr=lr)

    return Wrapped()


def _backbone_head() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.mark.parametrize("ns", NAMESPACES)
def test_backbone_and_one_linear_head_works_in_fit_validate_and_test(ns):
    """Measured: EarlyGiveUp() raised ValueError in setup for a conv backbone + one Linear head,
    aborting fit, validate and test."""
    torch.manual_seed(0)
    model = _lightning_module(ns, _backbone_head(), reshape=lambda x: x.view(-1, 1, 8, 8))
    cb = EarlyGiveUp(checkpoint_epoch=10, num_samples=100)
    t = trainer(ns, [cb], 2)
    train, vl = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, train, vl)
        t.validate(model, vl)
        t.test(model, vl)
    assert cb.layers == ["model.1", "model.7 (input)"]  # pooled 8x8 stage, penultimate features
    assert len(cb.history) == 2 and math.isfinite(cb.history[-1]["s_F"])


def test_lstm_model_is_scored_and_not_diverged():
    """Measured: an LSTM (tuple output) recorded 0 rows and a healthy run was stopped as 'diverged'."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = nn.LSTM(8, 24, batch_first=True), nn.Linear(24, 10)

        def forward(self, x):
            return self.head(self.lstm(x.view(-1, 8, 8))[0].mean(1))

    torch.manual_seed(0)
    cb = EarlyGiveUp(checkpoint_epoch=2, layers=["model.lstm"], verbose=False)
    t = trainer("pytorch_lightning", [cb], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(_lightning_module("pytorch_lightning", Net()), *loaders())
    assert cb.state.units == [24] and all(math.isfinite(h["s_o"]) for h in cb.history)
    assert cb.decision is not None and cb.decision.kind != "diverged"


def test_frozen_run_is_stalled_and_any_validation_frequency_works():
    """Measured: with check_val_every_n_epoch >= checkpoint_epoch the first decision was 'insufficient'
    and final. Now it waits for the next round. A run that does not move at all (lr = 0) is stalled."""
    torch.manual_seed(0)
    model = _lightning_module("pytorch_lightning", nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)), lr=0.0)
    cb = EarlyGiveUp(checkpoint_epoch=2)
    t = trainer("pytorch_lightning", [cb], 9, check_val_every_n_epoch=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, *loaders())
    assert [h["epoch"] for h in cb.history] == [3, 6]
    assert cb.gave_up and cb.decision.kind == "stalled" and t.current_epoch == 6


def test_callback_reused_for_a_second_fit_starts_afresh():
    """Measured: a callback reused for a second fit kept the first fit's history and decision."""
    cb = EarlyGiveUp(checkpoint_epoch=3)
    fit("pytorch_lightning", cb, "dead", max_epochs=5)
    assert cb.gave_up and len(cb.history) == 3
    t, _ = fit("pytorch_lightning", cb, "healthy", max_epochs=4)
    assert [h["epoch"] for h in cb.history] == [1, 2, 3, 4]
    assert not cb.gave_up and cb.decision.kind == "continue" and t.current_epoch == 4


def test_training_subset_has_no_repeated_samples():
    """Measured: without a validation loop the fixed subset repeated samples when the training
    set was smaller than num_samples."""
    small = TensorDataset(TRAIN[0][:100], TRAIN[1][:100])
    cb = EarlyGiveUp(checkpoint_epoch=10, num_samples=1000, verbose=False)
    torch.manual_seed(0)
    t = trainer("pytorch_lightning", [cb], 2, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(make_module("pytorch_lightning"), DataLoader(small, batch_size=32, shuffle=True))
    x = cb._subset[0]
    assert x.shape[0] == 100 and torch.unique(x, dim=0).shape[0] == torch.unique(small.tensors[0], dim=0).shape[0]
    assert len(cb.history) == 2


def test_t1_has_one_source_of_defaults():
    assert EarlyGiveUp().t1 == SpectralConfig().t1
    assert EarlyGiveUp(t1=0.3).config.t1 == 0.3
    assert EarlyGiveUp(config=SpectralConfig(t1=0.2)).t1 == 0.2


def test_give_up_plot_is_saved(tmp_path):
    pytest.importorskip("matplotlib")
    cb = EarlyGiveUp(checkpoint_epoch=3, plot=True, verbose=False)
    fit("pytorch_lightning", cb, "healthy", max_epochs=4, default_root_dir=str(tmp_path))
    assert (tmp_path / "give_up_scores.png").stat().st_size > 10_000


@pytest.mark.parametrize("ns", NAMESPACES)
def test_give_up_plot_is_logged_to_tensorboard(ns, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl = importlib.import_module(ns)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    cb = EarlyGiveUp(checkpoint_epoch=2, plot=True, verbose=False)
    fit(ns, cb, "dead", max_epochs=4, logger=logger)
    assert os.path.getsize(os.path.join(logger.log_dir, "give_up_scores.png")) > 10_000
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "give_up/scores" in events.Tags()["images"]


def test_bf16_mixed_precision_is_scored_in_float64():
    """Measured: a healthy fine-tuning under bf16-mixed was stopped as 'saturated'. The recorded
    bf16 activations are scored in float64 and a run above keep_above='auto' is never stuck-killed."""
    cb = EarlyGiveUp(checkpoint_epoch=3, verbose=False)
    t, _ = fit("lightning.pytorch", cb, "healthy", max_epochs=4, precision="bf16-mixed")
    assert all(math.isfinite(h["s_o"]) for h in cb.history) and t.current_epoch == 4
    assert not cb.gave_up and cb.decision.kind in ("continue", "converged")
