"""The give-up's state and the pure computations on it (lightning_ttp.pipeline.give_up_state): no Trainer."""

from __future__ import annotations

import math

import torch

from lightning_ttp.callbacks.early_give_up import GiveUpState as ReExported
from lightning_ttp.pipeline.give_up_state import (
    GiveUpState,
    accuracy_predictions,
    keep_above_threshold,
    round_decision,
    score_entry,
    score_metrics,
    trial_value,
)
from lightning_ttp.spectral import GiveUpDecision, SpectralConfig, compute_scores, layer_spectra


def _healthy_rounds(n: int) -> list[list[torch.Tensor]]:
    """n rounds of one layer whose spectrum decays faster every round (a compressing layer)."""
    return [[torch.tensor([1.0, 0.8 / (t + 1), 0.5 / (t + 1) ** 2, 0.2 / (t + 1) ** 3], dtype=torch.float64)]
            for t in range(n)]


def test_the_state_survives_to_dict_and_back_and_keeps_the_last_t0_plus_1_rounds():
    assert ReExported is GiveUpState  # still importable from the callback's module
    st = GiveUpState()
    for t, rnd in enumerate(_healthy_rounds(5)):
        st.add_round(rnd, [float(t)], [4], t0=2)
    assert len(st.spectra) == len(st.scales) == 3 and [r[0] for r in st.scales] == [2.0, 3.0, 4.0]
    st.decision = GiveUpDecision(True, "stalled", "epoch 4: stuck")
    st.decision_epoch, st.gave_up = 4, True
    back = GiveUpState.from_dict(st.to_dict())
    assert back.decision == st.decision and back.gave_up and back.decision_epoch == 4 and back.units == [4]
    assert all(torch.equal(a, b) for ra, rb in zip(back.spectra, st.spectra) for a, b in zip(ra, rb))


def test_layer_spectra_splits_the_spectra_of_each_matrix():
    gen = torch.Generator().manual_seed(0)
    values, scales, units = layer_spectra([torch.randn(8, 3, generator=gen), torch.zeros(8, 5)])
    assert units == [3, 5] and float(values[0][0]) == 1.0 and len(values[0]) == 3
    assert scales[1] == 0.0 and not values[1].any()  # a dead layer: all zeros
    assert layer_spectra([]) == ([], [], [])


def test_entry_metrics_and_trial_value_of_a_round():
    cfg = SpectralConfig()
    scores = compute_scores(_healthy_rounds(3), 3, 0.9, cfg, [4], [[1.0], [1.0], [1.0]])
    entry = score_entry(scores)
    assert entry["epoch"] == 3 and math.isfinite(entry["s_F"])
    metrics = score_metrics(entry)
    assert metrics["give_up/v_t"] == 0.9 and metrics["give_up/s_F"] == entry["s_F"]
    assert all(k.startswith("give_up/") and math.isfinite(v) for k, v in metrics.items())
    assert trial_value(entry) == entry["s_Fv"]
    assert trial_value({**entry, "s_Fv": math.nan}) == entry["s_F"]
    diverged = {**entry, "nonfinite_layers": 1}
    assert score_metrics(diverged) == {} and trial_value(diverged) is None


def test_keep_above_is_halfway_from_chance_to_1_when_auto():
    assert keep_above_threshold("auto", 10) == 0.1 + 0.5 * 0.9
    assert keep_above_threshold("auto", None) is None
    assert keep_above_threshold(0.3, 10) == 0.3 and keep_above_threshold(None, 10) is None


def test_accuracy_predictions_count_a_non_finite_row_as_wrong():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [math.nan, 1.0, 0.0]])
    classes, preds, targets = accuracy_predictions(logits, torch.tensor([0, 2, 1]))
    assert classes == 3 and preds.tolist() == [0, 2, 2]  # the NaN row predicts a class that is not its target
    classes, preds, _ = accuracy_predictions(torch.tensor([1.0, -1.0, math.inf]), torch.tensor([1, 1, 0]))
    assert classes == 2 and preds.tolist() == [1.0, 0.0, 1.0]
    assert accuracy_predictions(logits, torch.tensor([0.0, 1.0, 2.0])) is None  # float targets: no classification


def test_round_decision_acts_only_from_the_checkpoint_or_on_divergence():
    cfg = SpectralConfig()
    st = GiveUpState()
    assert round_decision(st, cfg, checkpoint_epoch=2) is None  # no round yet
    st.history.append(score_entry(compute_scores(_healthy_rounds(3), 3, None, cfg, [4], [[1.0]] * 3)))
    assert round_decision(st, cfg, checkpoint_epoch=5) is None  # before the checkpoint
    epoch, decision = round_decision(st, cfg, checkpoint_epoch=3)
    assert epoch == 3 and decision.kind != "diverged"
    nan = [[torch.full((4,), math.nan, dtype=torch.float64)]]
    st.history.append(score_entry(compute_scores(_healthy_rounds(2) + nan, 1, None, cfg, [4], [[1.0]] * 3)))
    epoch, decision = round_decision(st, cfg, checkpoint_epoch=5)
    assert epoch == 1 and decision.give_up and decision.kind == "diverged"  # divergence acts at once
    st.gave_up = True
    assert round_decision(st, cfg, checkpoint_epoch=1) is None
