"""Smoke tests of examples/: each example runs, at reduced size, and does what it says.

The examples run in this process (imported from their files and called with small sizes), except
the ddp_spawn one, which needs its own ``__main__`` to spawn from.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GLOO_EXIT_ABORT

pytest.importorskip("sklearn")
pytest.importorskip("lightning")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.usefixtures("_one_thread")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses / pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def test_lightning_cli_yaml_builds_the_three_callbacks_from_lightning_ttp(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning_ttp import EarlyGiveUp, ETAProgressBar, TrainingTimePredictor

    cli = _load("cli_digits").main([
        "fit", "--config", str(EXAMPLES / "cli_digits.yaml"),
        "--trainer.max_epochs", "10", "--trainer.default_root_dir", str(tmp_path),
    ])
    trainer = cli.trainer
    (predictor,) = [c for c in trainer.callbacks if isinstance(c, TrainingTimePredictor)]
    (give_up,) = [c for c in trainer.callbacks if isinstance(c, EarlyGiveUp)]
    assert isinstance(trainer.progress_bar_callback, ETAProgressBar)
    assert predictor.epsilons == (0.1, 0.01)  # from the YAML, not the defaults
    planned = trainer.estimated_stepping_batches
    assert len(predictor.prediction.loss) == planned + 1
    assert 0 < predictor.prediction.training_time(0.1) <= planned
    assert len(predictor.observed_losses) == trainer.global_step == planned
    # the decision is taken at the YAML's checkpoint epoch, from one history entry per epoch
    assert give_up.decided and [h["epoch"] for h in give_up.history] == list(range(1, 11))
    assert give_up.history[-1]["v_t"] == pytest.approx(float(trainer.callback_metrics["val_acc"]))


def test_optuna_trials_are_pruned_exactly_when_early_give_up_gives_up():
    optuna = pytest.importorskip("optuna")
    study = _load("optuna_give_up").main(["--trials", "8", "--epochs", "11", "--checkpoint-epoch", "10"])
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 8
    for t in pruned:  # pruned at the checkpoint, by EarlyGiveUp's on_give_up + TrialPruned
        assert "give_up" in t.user_attrs and max(t.intermediate_values) == 10
    for t in complete:  # reported every epoch from the 2nd (s_s needs two rounds), to the end
        assert "give_up" not in t.user_attrs and sorted(t.intermediate_values) == list(range(2, 12))
        assert 0.0 <= t.value <= 1.0


def test_transformer_fine_tuning_with_output_fn_predicts_from_dict_batches(tmp_path):
    predictor = _load("transformer_output_fn").main(
        ["--train-size", "128", "--epochs", "2", "--kernel-samples", "32", "--out", str(tmp_path)]
    )
    pred = predictor.prediction
    assert pred is not None, "the prediction failed: output_fn / target_fn were not used as documented"
    assert len(pred.loss) == 2 * 4 + 1  # 128 / 32 batches x 2 epochs
    # f0 through output_fn: the predicted loss at step 0 is the real loss of the fresh head
    assert pred.loss[0] == pytest.approx(predictor.observed_losses[0], rel=0.3)
    assert pred.loss[-1] < pred.loss[0]


@GLOO_EXIT_ABORT
def test_ddp_spawn_on_two_cpu_processes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp_spawn_cpu.py"), "--epochs", "2", "--checkpoint-epoch", "2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "distributed_backend=gloo" in log
    assert "× 2 process(es)" in log  # the predictor planned the global batch
    assert "[ddp] world size 2: predicted ε=0.1 at step" in log
    assert "give-up: epoch 2:" in log  # EarlyGiveUp decided (across both ranks) at the checkpoint
    assert "end-of-fit report failed" not in log
    assert list(tmp_path.rglob("ttp_prediction.png"))  # rank zero's plot (log_dir read on every rank)
