"""The predictor on the LightningModules people actually write: it works, or it refuses with a
message that names the fix. No silent wrong result."""

import importlib
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_ttp import TrainingTimePredictor

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]
N, D, C = 48, 5, 3


def _data(regression: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    if regression:
        return x, x @ torch.randn(D, generator=g)
    return x, (x @ torch.randn(D, C, generator=g)).argmax(1)


def _module(ns, *, out="tensor", regression=False, manual=False, scheduler=None):
    pl = importlib.import_module(ns)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(D, 8), nn.Tanh())
            self.head = nn.Linear(8, 1 if regression else C)
            self.other = nn.Linear(D, C)
            self.automatic_optimization = not manual

        def forward(self, x):
            logits = self.head(self.body(x))
            logits = logits[:, 0] if regression else logits
            if out == "tuple":
                return logits, self.body(x)
            if out == "dict":
                return {"hidden": self.body(x), "logits": logits}
            if out == "model_output":
                return OrderedDict(logits=logits)  # what transformers' ModelOutput subclasses
            return logits

        def _loss(self, batch):
            x, y = batch
            o = self(x)
            logits = o if isinstance(o, torch.Tensor) else (o[0] if isinstance(o, tuple) else o["logits"])
            return nn.functional.mse_loss(logits, y) if regression else nn.functional.cross_entropy(logits, y)

        def training_step(self, batch, batch_idx):
            if not manual:
                return self._loss(batch)
            first, second = self.optimizers()
            for opt, loss in ((first, self._loss(batch)), (second, nn.functional.cross_entropy(self.other(batch[0]),
                                                                                              batch[1]))):
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()

        def configure_optimizers(self):
            opt = torch.optim.SGD([*self.body.parameters(), *self.head.parameters()], lr=0.1, momentum=0.9)
            if manual:
                return [opt, torch.optim.SGD(self.other.parameters(), lr=0.1)]
            if scheduler is not None:
                return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"}}
            return opt

    return Net()


def _fit(ns, module, data, tmp_path, predictor, **trainer_kwargs):
    pl = importlib.import_module(ns)
    trainer_kwargs.setdefault("max_steps", 12)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[predictor], **trainer_kwargs)
    trainer.fit(module, data)
    return trainer


def _predictor(**kwargs):
    return TrainingTimePredictor(verbose=False, plot=False, num_paths=2, **kwargs)


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("out", ["tuple", "dict", "model_output"])
def test_structured_outputs_give_the_tensor_prediction_with_a_note(ns, out, tmp_path):
    data = DataLoader(TensorDataset(*_data()), batch_size=16)
    plain, structured = _predictor(), _predictor()
    _fit(ns, _module(ns), data, tmp_path, plain)
    _fit(ns, _module(ns, out=out), data, tmp_path, structured)
    np.testing.assert_allclose(structured.prediction.loss, plain.prediction.loss, rtol=1e-6)
    assert any("taken as the logits" in w for w in structured.prediction.diagnostics.warnings)


def test_float_targets_with_cross_entropy_are_refused_with_the_fix(tmp_path):
    data = DataLoader(TensorDataset(*_data(regression=True)), batch_size=16)
    predictor = _predictor()
    with pytest.warns(UserWarning, match="loss='mse'"):
        trainer = _fit("pytorch_lightning", _module("pytorch_lightning", regression=True), data, tmp_path, predictor)
    assert predictor.prediction is None and trainer.global_step == 12  # training went on
    mse = _predictor(loss="mse")
    _fit("pytorch_lightning", _module("pytorch_lightning", regression=True), data, tmp_path, mse)
    x, y = _data(regression=True)
    module = _module("pytorch_lightning", regression=True)
    with torch.no_grad():
        initial = nn.functional.mse_loss(module(x), y).item()
    assert mse.prediction.loss[0] == pytest.approx(initial, rel=1e-5)  # all 48 samples in the subset


@pytest.mark.parametrize("ns", NAMESPACES)
def test_manual_optimisation_with_two_optimisers_plans_in_global_steps(ns, tmp_path):
    data = DataLoader(TensorDataset(*_data()), batch_size=16)
    predictor = _predictor()
    trainer = _fit(ns, _module(ns, manual=True), data, tmp_path, predictor, max_steps=-1, max_epochs=4)
    assert trainer.global_step == 24  # 12 batches × 2 optimisers
    assert predictor.planned_steps == trainer.global_step
    assert predictor.prediction.num_steps == 12
    assert predictor.converge_step(0.1) == 2 * predictor.prediction.training_time(0.1)
    predictor = _predictor()
    trainer = _fit(ns, _module(ns, manual=True), data, tmp_path, predictor, max_steps=10)
    assert predictor.planned_steps == trainer.global_step == 10


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_true_precision_inputs_are_converted_like_training_batches(precision, tmp_path):
    data = DataLoader(TensorDataset(*_data()), batch_size=16)
    predictor = _predictor(strict=True)
    _fit("lightning.pytorch", _module("lightning.pytorch"), data, tmp_path, predictor, precision=precision)
    assert predictor.prediction is not None and np.isfinite(predictor.prediction.loss).all()


def test_prebatched_map_dataset(tmp_path):
    x, y = _data()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, N, 16)]
    predictor = _predictor(strict=True)
    _fit("pytorch_lightning", _module("pytorch_lightning"), DataLoader(batches, batch_size=None), tmp_path, predictor)
    assert predictor.plan["batch_size"] == 16 and predictor.plan["num_samples"] == N


class _Stream(IterableDataset):
    def __iter__(self):
        x, y = _data()
        return iter(zip(x, y))


def test_iterable_data_without_max_steps_names_the_fix(tmp_path):
    predictor = _predictor(strict=True)
    with pytest.raises(ValueError, match="IterableDataset.*steps="):
        _fit("pytorch_lightning", _module("pytorch_lightning"), DataLoader(_Stream(), batch_size=16), tmp_path,
             predictor, max_steps=-1, max_epochs=2)


def test_max_time_only_names_the_time_limit(tmp_path):
    predictor = _predictor(strict=True)
    with pytest.raises(ValueError, match="max_time"):
        _fit("pytorch_lightning", _module("pytorch_lightning"), DataLoader(TensorDataset(*_data()), batch_size=16),
             tmp_path, predictor, max_steps=-1, max_epochs=-1, max_time={"seconds": 2})


def test_cycled_momentum_is_noted(tmp_path):
    def one_cycle(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=12)

    predictor = _predictor()
    _fit("pytorch_lightning", _module("pytorch_lightning", scheduler=one_cycle),
         DataLoader(TensorDataset(*_data()), batch_size=16), tmp_path, predictor)
    assert any("momentum" in w for w in predictor.prediction.diagnostics.warnings)


@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "l1"}, "unknown loss"),
    ({"loss": "CrossEntropy"}, "unknown loss"),
    ({"method": "gd"}, "method must be one of"),
    ({"epsilons": "0.1"}, "epsilons"),
    ({"seed": 1.5}, "seed"),
    ({"refine_budget": 0}, "refine_budget"),
])
def test_constructor_rejects_what_would_fail_at_fit_start(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingTimePredictor(**kwargs)


def test_a_single_epsilon_is_accepted():
    assert TrainingTimePredictor(epsilons=0.1).epsilons == (0.1,)


# ----------------------------------------------------------------------------- token-level tasks
T, V = 4, 5


def _token_module(ns):
    pl = importlib.import_module(ns)

    class Tagger(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(7, 6)
            self.out = nn.Linear(6, V)

        def forward(self, tokens):
            return self.out(torch.tanh(self.emb(tokens)))  # (B, T, V)

        def training_step(self, batch, batch_idx):
            tokens, tags = batch
            return nn.functional.cross_entropy(self(tokens).reshape(-1, V), tags.reshape(-1), ignore_index=-100)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Tagger()


def _token_data(n=32):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 7, (n, T), generator=g)
    tags = (tokens % V).clone()
    tags[torch.rand(n, T, generator=g) < 0.3] = -100  # padding / unlabelled tokens
    return tokens, tags


#: a token classifier's training_step view: (B·T, V) logits and (B·T,) targets
FLAT = {"output_fn": lambda model, batch: model(batch[0]).reshape(-1, V),
        "target_fn": lambda batch: batch[1].reshape(-1)}


def test_token_classification_tokens_are_samples_with_ignore_index(tmp_path):
    tokens, tags = _token_data()
    predictor = _predictor(strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit("pytorch_lightning", _token_module("pytorch_lightning"), DataLoader(TensorDataset(tokens, tags),
             batch_size=32), tmp_path, predictor, max_steps=15)
    module = _token_module("pytorch_lightning")
    # full batch, plain GD: the linearised prediction's first step equals the real one to first order
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    real = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(module(tokens).reshape(-1, V), tags.reshape(-1))
        real.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = predictor.prediction
    assert pred.loss[0] == pytest.approx(real[0], rel=1e-6)
    assert pred.loss[1] == pytest.approx(real[1], rel=2e-2)
    assert any("token-level task" in w for w in pred.diagnostics.warnings)
    assert pred.error is not None and 0 <= pred.error[-1] <= pred.error[0]


# ----------------------------------------------------------------------------- zero harm
class _Counter(nn.Module):
    """A stateful layer of the kind users write: a buffer updated by every forward pass (any mode)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


def _stateful_layer(kind):
    if kind == "batchnorm":
        return nn.BatchNorm1d(8)
    if kind == "dropout":
        return nn.Dropout(0.3)
    if kind == "spectral_norm":  # power iteration on its u/v buffers in train mode
        return nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))
    return _Counter()


def _stateful_module(kinds):
    pl = importlib.import_module("pytorch_lightning")

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(D, 8), *[_stateful_layer(k) for k in kinds], nn.Tanh(), nn.Linear(8, C))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    return Net()


def _seeded_fit(kinds, tmp_path, callbacks, n=N, **trainer_kwargs):
    """The same seeded, deterministic fit with or without ``callbacks``: its state_dict, the RNG
    streams after it (torch, numpy, python) and the optimiser's state."""
    import random

    pl = importlib.import_module("pytorch_lightning")
    pl.seed_everything(3, verbose=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, D, generator=g)
    y = (x @ torch.randn(D, C, generator=g)).argmax(1)
    module = _stateful_module(kinds)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=any(type(c).__name__ == "ETAProgressBar" for c in callbacks),
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                         default_root_dir=str(tmp_path), callbacks=callbacks, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = DataLoader(TensorDataset(x, y), batch_size=16) if trainer_kwargs.get("limit_val_batches", 1) else None
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), val)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    return module.state_dict(), rng, trainer.optimizers[0].state_dict()


def _assert_bit_identical(plain, with_callbacks):
    (state_a, rng_a, opt_a), (state_b, rng_b, opt_b) = plain, with_callbacks
    assert state_a.keys() == state_b.keys()
    for key in state_a:  # parameters AND buffers (running statistics, num_batches_tracked, u/v, counters)
        assert torch.equal(state_a[key], state_b[key]), key
    assert torch.equal(rng_a[0], rng_b[0]) and np.array_equal(rng_a[1], rng_b[1]) and rng_a[2] == rng_b[2]
    for (_, sa), (_, sb) in zip(sorted(opt_a["state"].items()), sorted(opt_b["state"].items())):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize("kind", ["batchnorm", "dropout", "spectral_norm", "counter"])
def test_the_predictor_leaves_stateful_layers_bit_identical(kind, tmp_path):
    """A train-mode BatchNorm, Dropout, spectral norm or counting layer: the fit with the predictor
    (closed loop re-linearising) ends with the same parameters, buffers, RNG streams and optimiser
    state as the same seeded fit without it."""
    # 96 samples, a kernel subset of 80: above budget.MIN_SAMPLES, so the cost budget's pilot runs too
    predictor = _predictor(strict=True, num_samples=80, relinearise_budget=1e6)
    plain = _seeded_fit([kind], tmp_path, [], n=96, max_steps=12, limit_val_batches=0)
    fitted = _seeded_fit([kind], tmp_path, [predictor], n=96, max_steps=12, limit_val_batches=0)
    assert predictor.prediction is not None and predictor.state.live_step is not None  # the closed loop ran
    _assert_bit_identical(plain, fitted)


def test_all_three_callbacks_leave_the_fit_bit_identical(tmp_path):
    """TrainingTimePredictor (closed loop on), EarlyGiveUp (validation every epoch) and the ETA bar
    together, on a model with BatchNorm, Dropout, spectral norm and a counting layer in train mode."""
    from lightning_ttp import EarlyGiveUp, ETAProgressBar

    kinds = ["batchnorm", "dropout", "spectral_norm", "counter"]
    predictor = _predictor(strict=True, num_samples=32, relinearise_budget=1e6)
    give_up = EarlyGiveUp(checkpoint_epoch=2, num_samples=16, mode="warn", plot=False, verbose=False, strict=True)
    plain = _seeded_fit(kinds, tmp_path, [], max_epochs=3)
    fitted = _seeded_fit(kinds, tmp_path, [predictor, give_up, ETAProgressBar()], max_epochs=3)
    assert predictor.prediction is not None and predictor.state.live_step is not None
    assert len(give_up.history) == 3
    _assert_bit_identical(plain, fitted)


def test_early_give_up_subset_pass_without_validation_leaves_the_fit_bit_identical(tmp_path):
    """Without a validation loop EarlyGiveUp runs its own forward pass over a training subset."""
    from lightning_ttp import EarlyGiveUp

    kinds = ["batchnorm", "counter"]
    give_up = EarlyGiveUp(checkpoint_epoch=2, num_samples=16, mode="warn", plot=False, verbose=False, strict=True)
    plain = _seeded_fit(kinds, tmp_path, [], max_epochs=2, limit_val_batches=0)
    fitted = _seeded_fit(kinds, tmp_path, [give_up], max_epochs=2, limit_val_batches=0)
    assert len(give_up.history) == 2
    _assert_bit_identical(plain, fitted)


def test_predict_training_time_leaves_buffers_and_rng_untouched():
    """The plain-PyTorch twin, on a train-mode model with every stateful layer and a data set large
    enough for the cost budget's pilot (which times training steps in train mode)."""
    import random

    from lightning_ttp import predict_training_time

    model = _stateful_module(["batchnorm", "dropout", "spectral_norm", "counter"])
    model.train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(160, D, generator=g)
    y = (x @ torch.randn(D, C, generator=g)).argmax(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11), np.random.seed(11), random.seed(11)  # noqa: NPY002
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = predict_training_time(model, DataLoader(TensorDataset(x, y), batch_size=16), opt, 20, num_samples=128,
                                     num_paths=2)
    assert np.isfinite(pred.loss).all()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng[0], torch.get_rng_state()) and np.array_equal(rng[1], np.random.get_state()[1])  # noqa: NPY002
    assert rng[2] == random.getstate()
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------- pre-batched map-style data
def _prebatched(items=16, size=32, last=None):
    g = torch.Generator().manual_seed(2)
    n = (items - 1) * size + (last or size)
    x = torch.randn(n, D, generator=g)
    y = (x @ torch.randn(D, C, generator=g)).argmax(1)
    return x, y, [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


@pytest.mark.parametrize("last", [None, 7])
def test_prebatched_map_dataset_plans_samples_not_items(last, tmp_path):
    """16 items that are batches of 32: the plan reads 512 samples (16 steps per epoch, mini-batch
    SGD), exactly as the same data unbatched in a DataLoader(batch_size=32) gives it."""
    from lightning_ttp.pipeline.plan import plan_run

    x, y, items = _prebatched(last=last)
    keys = ("dataset_size", "steps_per_epoch", "full_batch", "batch_size", "effective_batch_size")
    opt = torch.optim.SGD([nn.Parameter(x[0])], lr=1.0)
    reference = plan_run(DataLoader(TensorDataset(x, y), batch_size=32), opt, 40)
    prebatched = plan_run(DataLoader(items, batch_size=None), opt, 40)
    assert reference.dataset_size == len(x) == 15 * 32 + (last or 32)
    assert {k: prebatched.describe()[k] for k in keys} == {k: reference.describe()[k] for k in keys}
    assert any("pre-batched data set: 16 items" in n for n in prebatched.notes)
    plans = []
    for loader in (DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(items, batch_size=None)):
        predictor = _predictor(strict=True, num_samples=32, refine=False)
        _fit("pytorch_lightning", _module("pytorch_lightning"), loader, tmp_path, predictor, max_steps=4)
        plans.append({k: predictor.plan[k] for k in keys})
    assert plans[1] == plans[0] == {k: reference.describe()[k] for k in keys}
    assert plans[1]["steps_per_epoch"] == 16 and not plans[1]["full_batch"]


@pytest.mark.parametrize("flatten", [False, True])
def test_token_classification_predict_training_time_under_the_cost_budget(flatten):
    """96 sequences (above budget.MIN_SAMPLES: the cost pilot times a training step with the loss):
    the default (B, T, C) path and a flattening output_fn/target_fn give the same prediction, whose
    first point is the real token-mean cross-entropy of the kernel subset."""
    from lightning_ttp import predict_training_time
    from lightning_ttp.pipeline.data import sample_subset

    tokens, tags = _token_data(96)
    loader = DataLoader(TensorDataset(tokens, tags), batch_size=32)
    model = _token_module("pytorch_lightning")
    kwargs = FLAT if flatten else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = predict_training_time(model, loader, torch.optim.SGD(model.parameters(), lr=0.5), 10, num_paths=2,
                                     **kwargs)
        reference = predict_training_time(model, loader, torch.optim.SGD(model.parameters(), lr=0.5), 10,
                                          num_paths=2, budget=None, num_samples=96)
    assert any("token-level task" in w for w in pred.diagnostics.warnings)
    kept = pred.diagnostics["budget"]["num_samples"]
    (x, y), _ = sample_subset(loader, 96, 0)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:kept].sort().values
    with torch.no_grad():
        real = nn.functional.cross_entropy(model(x[order]).reshape(-1, V), y[order].reshape(-1)).item()
    assert pred.loss[0] == pytest.approx(real, rel=1e-6)
    with torch.no_grad():
        assert reference.loss[0] == pytest.approx(nn.functional.cross_entropy(model(x).reshape(-1, V),
                                                                              y.reshape(-1)).item(), rel=1e-6)


def test_token_classification_flattening_output_fn_in_the_callback_with_the_closed_loop(tmp_path):
    """The callback with FLAT: the same prediction as the default (B, T, C) path, and the closed loop
    re-linearises with the regrouped outputs (strict: any failure would raise)."""
    tokens, tags = _token_data()
    predictors = [_predictor(strict=True, relinearise_budget=1e6), _predictor(strict=True, relinearise_budget=1e6,
                                                                              **FLAT)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for predictor in predictors:
            _fit("pytorch_lightning", _token_module("pytorch_lightning"),
                 DataLoader(TensorDataset(tokens, tags), batch_size=32), tmp_path, predictor, max_steps=15)
    default, flat = predictors
    np.testing.assert_allclose(flat.prediction.loss, default.prediction.loss, rtol=1e-9)
    assert flat.state.live_step is not None and default.state.live_step is not None
    np.testing.assert_allclose(flat.state.live_loss, default.state.live_loss, rtol=1e-6)
    module = _token_module("pytorch_lightning")
    with torch.no_grad():
        real = nn.functional.cross_entropy(module(tokens).reshape(-1, V), tags.reshape(-1)).item()
    assert flat.prediction.loss[0] == pytest.approx(real, rel=1e-6)


def test_rows_that_match_no_sample_are_refused_with_the_fix():
    """An output_fn whose rows are neither one per sample nor flattened like the targets."""
    from lightning_ttp import predict_training_time

    tokens, tags = _token_data()
    model = _token_module("pytorch_lightning")
    with pytest.raises(ValueError, match="return one row per sample from output_fn.*or flatten both"):
        predict_training_time(model, (tokens, tags), torch.optim.SGD(model.parameters(), lr=0.5), 5,
                              output_fn=lambda m, b: m(b[0]).reshape(-1, V))


# ----------------------------------------------------------------------------- diverging runs
def _csv_fit(module, data, tmp_path, callbacks, **trainer_kwargs):
    pl = importlib.import_module("pytorch_lightning")
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         num_sanity_val_steps=0, log_every_n_steps=1, callbacks=callbacks, **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(*([module] + list(data)))
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    return [str(w.message) for w in caught], rows


def test_a_diverging_lr_is_one_note_with_the_max_stable_lr_and_no_follow_up_failure(tmp_path):
    """SGD lr=5 on MSE: the simulation diverges. One sentence says so with the stability report's
    max stable lr; the refinement and the closed loop add no failure; only finite points are logged."""
    x, y = _data(regression=True)
    predictor = _predictor(loss="mse", relinearise_budget=1e6)
    module = _module("pytorch_lightning", regression=True)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=5.0)
    messages, rows = _csv_fit(module, [DataLoader(TensorDataset(x, y), batch_size=16)], tmp_path, [predictor],
                              max_steps=30)
    pred = predictor.prediction
    assert pred.diverged and np.isfinite(pred.diagnostics["max_stable_lr"])
    ours = [m for m in messages if "lightning_ttp" in m or "diverges" in m or "stab" in m]
    assert ours == [next(w for w in pred.diagnostics.warnings if "diverges" in w)]
    assert ours[0].startswith(f"the simulated run diverges at this lr (max stable lr ≈ "
                              f"{pred.diagnostics['max_stable_lr']:.3g}")
    assert 5.0 > pred.diagnostics["max_stable_lr"]
    logged = [r["ttp/predicted_loss"] for r in rows if "ttp/predicted_loss" in r]
    assert logged and np.isfinite(logged).all()
    assert logged == [float(v) for v in pred.loss[: len(logged)]]  # the finite start of the curve, as predicted
    assert "diverges" in predictor.summary()


def test_a_run_that_turns_nan_is_given_up_with_its_decision_logged_not_nan_scores(tmp_path):
    """The loss turns NaN at step 10: EarlyGiveUp gives up ("diverged") and that round logs the
    decision, no scores; the predictor's closed loop stops without a failure warning."""
    from lightning_ttp import EarlyGiveUp

    pl = importlib.import_module("pytorch_lightning")

    class Blows(type(_module("pytorch_lightning"))):
        def training_step(self, batch, batch_idx):
            if self.global_step >= 10:
                with torch.no_grad():
                    self.body[0].weight.fill_(float("nan"))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    assert issubclass(Blows, pl.LightningModule)
    give_up = EarlyGiveUp(checkpoint_epoch=10, num_samples=32, plot=False, verbose=False)
    predictor = _predictor(relinearise_budget=1e6)
    data = DataLoader(TensorDataset(*_data()), batch_size=16)
    messages, rows = _csv_fit(Blows(), [data, data], tmp_path, [predictor, give_up], max_epochs=8)
    assert give_up.gave_up and give_up.decision.kind == "diverged"
    assert not [m for m in messages if "failed" in m]
    diverged_epoch = give_up.state.decision_epoch - 1  # Lightning's 0-based epoch of that round
    scored = [r for r in rows if any(k.startswith("give_up/s_") for k in r)]
    assert scored and all(r["epoch"] < diverged_epoch for r in scored)
    assert all(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("give_up/"))
    assert [r["give_up/gave_up"] for r in rows if "give_up/gave_up" in r] == [1.0]
