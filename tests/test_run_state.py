"""The callback's state and the pure computations on it (lightning_ttp.pipeline.run_state): no Trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_ttp import Prediction
from lightning_ttp.pipeline.run_state import (
    PredictorState,
    converge_step,
    eta,
    real_run_diverged,
    refit_steps,
    relinearisation_steps,
)


def test_refit_steps_are_the_live_fractions_of_the_run_from_step_2():
    assert refit_steps(1000) == [20, 50, 100, 250, 500]
    assert refit_steps(40) == [2, 4, 10, 20]  # 2 % of 40 falls before step 2: dropped; the rest rounded
    assert refit_steps(0) == [] and refit_steps(3) == []


def test_relinearisation_steps_spend_the_counted_budget_in_order():
    # a call at k counts the kernel (passes + contraction + extras = 10) and (T − k) simulated steps at 0.1
    counts = {"components": {"passes": 6.0, "contraction": 3.0, "extras": 1.0, "simulation": 20.0},
              "simulated_steps": 200, "run_macs": 1000.0, "predicted_macs": 30.0}
    steps = [2, 5, 10, 20, 40]  # of T = 100: calls count 19.8, 19.5, 19, 18, 16
    assert relinearisation_steps(steps, counts, 100, share=0.0) == [2]  # 19.8 + 19.5 > 30: the first only
    assert relinearisation_steps(steps, counts, 100, share=0.01) == [2, 5]  # 39.3 <= 40 < 58.3
    assert relinearisation_steps(list(reversed(steps)), counts, 100, share=0.1) == steps  # 92.3 <= 130
    assert relinearisation_steps(steps, None, 100, share=1e6) == [2]  # nothing counted: the first call only
    # the kernel split across 4 processes: the counts are one process's, and so is the run's share
    split = {**counts, "processes": 4}
    assert relinearisation_steps(steps, split, 100, share=0.04) == [2, 5]  # 39.3 <= 30 + 10 < 58.3
    assert relinearisation_steps([], counts, 100, share=1.0) == []
    # a kernel at w_k dearer than the fit-start one (on batch statistics): its own count, 25 per call
    dearer = {**counts, "relinearisation_macs": 25.0}
    assert relinearisation_steps(steps, dearer, 100, share=0.1) == [2, 5, 10]  # 99.3 <= 130 < 140.3


def test_real_run_diverged_reads_the_latest_loss():
    assert not real_run_diverged([]) and not real_run_diverged([1.0, 0.5])
    assert real_run_diverged([1.0, math.nan]) and real_run_diverged([1.0, math.inf])
    assert not real_run_diverged([math.nan, 0.5])


def test_eta_counts_down_and_stays_unknown_without_its_inputs():
    assert eta(400, 100, 1000, 0.5) == {
        "converge_step": 400, "steps_to_converge": 300, "steps_to_end": 900, "seconds_per_step": 0.5,
        "eta_converge_seconds": 150.0, "eta_end_seconds": 450.0,
    }
    late = eta(400, 1200, 1000, None)
    assert late["steps_to_converge"] == 0 and late["steps_to_end"] == 0 and late["eta_end_seconds"] is None


def test_the_state_round_trips_and_its_current_curve_is_the_latest_one():
    steps = np.arange(101)
    curve = 0.2 + np.exp(-steps / 20.0)
    state = PredictorState(prediction=Prediction(steps, curve), plan={"steps": 100}, observed_losses=[1.2, 1.1])
    with pytest.raises(RuntimeError):
        PredictorState().current_curve()
    np.testing.assert_array_equal(state.current_curve(), curve)
    state.live_loss, state.live_step = (0.5 * curve).tolist(), 5
    np.testing.assert_allclose(state.current_curve(), 0.5 * curve)
    assert converge_step(state.current_curve(), 0.1, step_unit=2) == 2 * converge_step(state.current_curve(), 0.1)
    state.refinement = state.refit((0.5 * curve[:30]).tolist())
    np.testing.assert_array_equal(state.current_curve(), state.refinement.loss)
    back = PredictorState.from_dict(state.to_dict())
    assert back.to_dict() == state.to_dict()
    np.testing.assert_allclose(back.current_curve(), state.current_curve())
    missing = state.to_dict()
    del missing["live_loss"]
    with pytest.raises(KeyError, match="live_loss"):
        PredictorState.from_dict(missing)
