"""ε-training-time on hand-made curves, smoothing, thresholds and the Prediction object."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import uniform_filter1d

from lightning_ttp import Prediction
from lightning_ttp.dynamics import epsilon_training_time, smooth_curve


def test_monotone_exponential_curve():
    t = np.arange(151)
    curve = 0.5 + 2.0 * np.exp(-t / 20.0)
    # |L_t - L_T| = 2(e^{-t/20} - e^{-7.5}) <= eps * 2(1 - e^{-7.5})  <=>  t >= -20 log(eps(1 - e^-7.5) + e^-7.5)
    for eps in (0.01, 0.1, 0.4):
        expected = int(np.ceil(-20 * np.log(eps * (1 - np.exp(-7.5)) + np.exp(-7.5))))
        assert epsilon_training_time(curve, eps) == expected
    assert epsilon_training_time(curve, 0.4) < epsilon_training_time(curve, 0.1) < epsilon_training_time(curve, 0.01)


def test_noisy_curve_uses_the_last_excursion_and_smoothing():
    t = np.arange(101)
    curve = 1.0 + np.exp(-t / 10.0)
    noisy = curve.copy()
    noisy[60] += 0.3  # a late spike: the curve has not "stayed" converged before step 61
    expected = int(np.ceil(-10 * np.log(0.1 + 0.9 * np.exp(-10))))  # 24
    assert epsilon_training_time(curve, 0.1) == expected == 24
    assert epsilon_training_time(noisy, 0.1) == 61
    # The documented smoothing (a moving average inside the curve) dilutes the spike below the threshold.
    assert epsilon_training_time(noisy, 0.1, window=9) < 40
    np.testing.assert_allclose(smooth_curve(curve, 1), curve)


def test_smoothing_is_the_moving_average_inside_and_unbiased_at_the_ends():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(60)
    inner = np.convolve(values, np.ones(9) / 9, mode="valid")  # the centred mean of width 9
    np.testing.assert_allclose(smooth_curve(values, 9)[4:-4], inner)
    ramp = 3.0 - 0.02 * np.arange(40)  # a line is kept, its ends included (a padded mean lifts L_T, lowers L_0)
    np.testing.assert_allclose(smooth_curve(ramp, 9), ramp)
    np.testing.assert_allclose(smooth_curve(ramp[:5], 9), ramp[:5])  # window shrunk to the curve
    assert smooth_curve([1.0, 2.0], 9).tolist() == [1.0, 2.0]
    diverged = np.concatenate([ramp[:-1], [np.inf]])  # a non-finite loss: returned as it is, never converged
    np.testing.assert_array_equal(smooth_curve(diverged, 9), diverged)
    assert epsilon_training_time(diverged, 0.1, window=9) is None
    # a falling noisy curve: the smoothed end points estimate L_0 and L_T without the padded mean's bias
    t = np.arange(301)
    clean = 0.5 + 0.9 * np.exp(-t / 40)
    ends = np.array([smooth_curve(clean + 0.1 * rng.standard_normal(t.size), 33)[[0, -1]] for _ in range(200)])
    padded = uniform_filter1d(clean, 33, mode="nearest")[0]  # the bias this replaced: 0.08 below L_0
    assert padded < clean[0] - 0.07
    assert abs(ends[:, 0].mean() - clean[0]) < 0.5 * (clean[0] - padded)  # a line misses the curvature only
    assert abs(ends[:, 1].mean() - clean[-1]) < 0.01


def test_smoothing_of_degree_zero_takes_the_windows_means_at_the_ends():
    values = np.random.default_rng(4).standard_normal(40)
    smooth = smooth_curve(values, 9, degree=0)
    np.testing.assert_allclose(smooth[:5], values[:9].mean())  # the first window's mean, not a line's end
    np.testing.assert_allclose(smooth[-5:], values[-9:].mean())
    np.testing.assert_allclose(smooth[4:-4], np.convolve(values, np.ones(9) / 9, mode="valid"))
    with pytest.raises(ValueError, match="degree must be 0"):
        smooth_curve(values, 9, degree=2)


def test_flat_and_never_converging_curves():
    assert epsilon_training_time(np.full(50, 0.7), 0.1) == 0  # already converged
    rising = np.linspace(1.0, 2.0, 50)  # the loss goes up: never converges
    assert epsilon_training_time(rising, 0.1) is None
    assert epsilon_training_time(np.array([1.0, np.nan, 0.5]), 0.1) is None  # diverged
    # Still decreasing linearly at T: converges only at the end, T_eps = ceil((1 - eps) T).
    linear = np.linspace(1.0, 0.0, 101)
    assert epsilon_training_time(linear, 0.1) == 90
    assert epsilon_training_time(linear, 0.4) == 60


@pytest.mark.parametrize("eps", [0.0, 1.0, 1.5, -0.2, 10])
def test_eps_outside_unit_interval_is_rejected(eps):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        epsilon_training_time(np.linspace(1, 0, 5), eps)


def make_prediction():
    t = np.arange(31)
    loss = 0.2 + np.exp(-t / 5.0)
    err = np.clip(0.8 * np.exp(-t / 8.0), 0, 1)
    return Prediction(t, loss, (loss - 0.05, loss + 0.05), err, (err - 0.01, err + 0.01),
                      {"method": "mc", "warnings": ["w"], "nested": {"a": [1, 2.5]}})


def test_prediction_queries():
    p = make_prediction()
    assert p.num_steps == 30 and p.method == "mc"
    assert p.training_time(0.1) == epsilon_training_time(p.loss, 0.1)
    assert p.training_time(0.1, curve="error") == epsilon_training_time(p.error, 0.1)
    assert p.steps_to_loss(0.5) == int(np.ceil(-5 * np.log(0.3)))
    assert p.steps_to_loss(0.1) is None  # not reached within T
    assert p.steps_to_accuracy(0.8) == int(np.ceil(-8 * np.log(0.2 / 0.8)))
    assert p.steps_to_accuracy(0.9999) is None
    with pytest.raises(ValueError):
        p.steps_to_accuracy(80)
    reg = Prediction(np.arange(3), [1.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="no error curve"):
        reg.steps_to_accuracy(0.5)
    with pytest.raises(ValueError, match="equal length"):
        Prediction(np.arange(3), [1.0, 0.5])


def test_round_trip_is_exact_through_json():
    p = make_prediction()
    p.loss[3] = 1 / 3  # a value without a short decimal form
    d = json.loads(json.dumps(p.to_dict()))
    q = Prediction.from_dict(d)
    np.testing.assert_array_equal(q.loss, p.loss)
    np.testing.assert_array_equal(q.error_band[1], p.error_band[1])
    assert q.to_dict() == p.to_dict() and q.diagnostics == p.diagnostics
    assert q.steps.dtype == np.int64
    assert q.diagnostics["nested"] == {"a": [1, 2.5]}  # unknown keys live in Diagnostics.extra
    d["diagnostics"]["extra"]["nested"]["a"].append(3)  # no aliasing with the source dict
    assert p.diagnostics["nested"]["a"] == [1, 2.5]
