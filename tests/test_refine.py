"""Closed-loop refinement (pure function, no Lightning)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_ttp.pipeline.refine import (
    Refinement,
    default_smoothing_window,
    epsilon_training_time,
    refine_curve,
    smooth_losses,
)

T = 200
STEPS = np.arange(T + 1)
PREDICTED = 0.3 + 2.0 * np.exp(-STEPS / 40)


def _real(warp: float, amplitude: float = 2.0, floor: float = 0.3) -> np.ndarray:
    return floor + amplitude * np.exp(-warp * STEPS / 40)


def test_no_observations_returns_the_prediction():
    r = refine_curve(PREDICTED, [])
    assert r.warp == 1.0 and r.scale == 1.0 and r.num_observed == 0
    np.testing.assert_array_equal(r.loss, PREDICTED)


@pytest.mark.parametrize("warp", [0.6, 1.0, 1.5])
def test_exact_observations_recover_the_warp(warp):
    real = _real(warp)
    r = refine_curve(PREDICTED, real[:60])
    assert r.warp == pytest.approx(warp, rel=0.02)
    # the refined curve continues the real one beyond the observed prefix (where defined)
    horizon = int(T / max(warp, 1.0))
    np.testing.assert_allclose(r.loss[:horizon], real[:horizon], rtol=0.02, atol=1e-3)


def test_refinement_reduces_the_training_time_error_under_noise():
    rng = np.random.default_rng(0)
    errors_open, errors_refined = [], []
    for warp in (0.7, 0.8, 1.25, 1.4):
        real = _real(warp, amplitude=2.1, floor=0.28)
        noisy = real + rng.normal(0.0, 0.05, size=real.size)
        t_real = epsilon_training_time(real, 0.1)
        t_open = epsilon_training_time(PREDICTED, 0.1)
        r = refine_curve(PREDICTED, noisy[: T // 4])
        errors_open.append(abs(t_open - t_real) / t_real)
        errors_refined.append(abs(r.training_time(0.1) - t_real) / t_real)
    assert np.median(errors_refined) < 0.5 * np.median(errors_open)
    assert np.median(errors_refined) < 0.1


def test_prior_keeps_few_noisy_points_close_to_the_prediction():
    rng = np.random.default_rng(1)
    noisy = PREDICTED[:3] + rng.normal(0.0, 0.3, size=3)
    r = refine_curve(PREDICTED, noisy)
    assert 0.5 < r.warp < 2.0
    assert r.noise > 0


def test_band_is_mapped_and_round_trip():
    band = (PREDICTED * 0.9, PREDICTED * 1.1)
    r = refine_curve(PREDICTED, _real(1.2)[:50], band=band)
    assert r.loss_band is not None
    low, high = r.loss_band
    assert np.all(low <= r.loss + 1e-12) and np.all(r.loss <= high + 1e-12)
    back = Refinement.from_dict(r.to_dict())
    np.testing.assert_array_equal(back.loss, r.loss)
    assert back.warp == r.warp and back.training_time(0.1) == r.training_time(0.1)
    assert r.steps_to_loss(float(r.loss[10])) == 10


def test_non_finite_observations_are_dropped():
    obs = _real(1.2)[:40].copy()
    obs[5] = np.nan
    r = refine_curve(PREDICTED, obs)
    assert r.num_observed == 39 and np.isfinite(r.warp)


def test_observed_steps_subset():
    real = _real(1.3)
    steps = np.arange(0, 80, 4)
    r = refine_curve(PREDICTED, real[steps], observed_steps=steps)
    assert r.warp == pytest.approx(1.3, rel=0.03)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="1-D curve"):
        refine_curve([1.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        refine_curve([1.0, np.inf], [1.0])
    with pytest.raises(ValueError, match="observed_steps"):
        refine_curve(PREDICTED, [1.0, 2.0], observed_steps=[0])


def test_smoothing_window_rule():
    assert default_smoothing_window(8, full_batch=True) == 1
    assert default_smoothing_window(8, full_batch=False) == 9
    assert default_smoothing_window(None, full_batch=False) == 1
    flat = smooth_losses(np.ones(20), 5)
    np.testing.assert_allclose(flat, 1.0)
