"""Eq. (2)–(8) of the DAI paper against hand-computed values, and the give-up rule."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ttp.spectral import (
    SpectralConfig,
    alpha_weights,
    combined_score,
    compression_score,
    compute_scores,
    decide,
    effective_rank,
    final_score,
    final_score_with_accuracy,
    is_saturated,
    layer_compression,
    layer_shift,
    normalized_singular_values,
    shift_score,
    spectrum_of,
)

T = torch.tensor
# three rounds of one 3-unit layer; per-round sums 2.0, 1.7, 1.3
H3 = [T([1.0, 0.5, 0.5]), T([1.0, 0.4, 0.3]), T([1.0, 0.2, 0.1])]
PAPER = SpectralConfig.paper(t0=5)


# ---------------------------------------------------------------- spectra
def test_normalised_singular_values_of_a_diagonal_matrix():
    a = torch.diag(T([2.0, 8.0, 4.0]))
    assert torch.allclose(normalized_singular_values(a), T([1.0, 0.5, 0.25], dtype=torch.float64))


def test_fewer_samples_than_units_gives_min_m_d_values():
    a = torch.zeros(2, 5)
    a[0, 0], a[1, 3] = 3.0, 1.0
    v = normalized_singular_values(a)
    assert v.shape == (2,)
    assert torch.allclose(v, T([1.0, 1 / 3], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(300, 80), (70, 200), (20, 10)])
def test_gram_path_matches_svdvals(shape):
    a = torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(1)))
    a[:, :5] *= 10.0  # a few dominant directions
    ref = torch.linalg.svdvals(a.double())
    assert torch.allclose(normalized_singular_values(a), ref / ref[0], atol=1e-10)
    assert torch.allclose(normalized_singular_values(a, torch.float32), ref / ref[0], atol=1e-3)


def test_dead_layer_and_non_finite_rows():
    dead = spectrum_of(torch.zeros(6, 4))
    assert dead.dead and torch.equal(dead.values, torch.zeros(4, dtype=torch.float64))
    a = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[3, 1] = float("nan")
    b[7, 0] = float("inf")
    s = spectrum_of(b)
    assert s.dropped == 2 and s.samples == 8
    keep = [i for i in range(10) if i not in (3, 7)]
    assert torch.allclose(s.values, normalized_singular_values(a[keep]))
    assert torch.isnan(normalized_singular_values(torch.full((5, 3), float("nan")))).all()


def test_effective_rank_of_flat_and_rank_one_spectra():
    assert effective_rank(torch.ones(8, dtype=torch.float64)) == pytest.approx(8.0, rel=1e-6)
    assert effective_rank(T([1.0, 0.0, 0.0], dtype=torch.float64)) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------- eq. (2), (3)
def test_eq2_paper_mode_mean_over_window():
    # β d_l (t0+1) / ΣΣσ = 9 / 5
    assert layer_compression(H3, PAPER) == pytest.approx(9 / 5)
    # d_l = 4 > r = 3: the missing singular value counts as 0 -> 12 / 5
    assert layer_compression(H3, PAPER, units=4) == pytest.approx(12 / 5)
    # window t0 = 1: the last two rounds only -> 6 / 3.0
    assert layer_compression(H3, SpectralConfig.paper(t0=1)) == pytest.approx(2.0)
    # β scales
    assert layer_compression(H3, SpectralConfig.paper(beta=2.0)) == pytest.approx(18 / 5)


def test_eq2_rank_mode_is_log_rank_normalised():
    cfg = SpectralConfig(t0=5)
    assert layer_compression(H3, cfg) == pytest.approx(math.exp(math.log(9 / 5) / math.log(3)))
    # a flat spectrum has no compression, a rank-one spectrum the most
    assert layer_compression([torch.ones(16)], cfg) == pytest.approx(1.0)
    one = torch.zeros(16)
    one[0] = 1.0
    assert layer_compression([one], cfg) == pytest.approx(math.e)


def test_eq3_averages_layers_and_skips_undefined_ones():
    other = [T([1.0, 0.0]), T([1.0, 0.0]), T([1.0, 0.0])]  # mean 1/2 -> 2
    hist = [[a, b] for a, b in zip(H3, other, strict=True)]
    assert compression_score(hist, PAPER) == pytest.approx((9 / 5 + 2.0) / 2)
    nan_layer = [torch.full((2,), float("nan"))] * 3
    hist = [[a, b] for a, b in zip(H3, nan_layer, strict=True)]
    assert compression_score(hist, PAPER) == pytest.approx(9 / 5)


# ---------------------------------------------------------------- eq. (4), (5)
def test_alpha_weights_rise_linearly_to_one():
    assert torch.allclose(alpha_weights(4), T([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


def test_eq4_paper_mode_weighted_mean_decrease():
    # per-unit decreases 0.3/3 = 0.1 and 0.4/3; α = (1/2, 1); divide by Σα = 3/2
    expected = (0.5 * 0.1 + 1.0 * 0.4 / 3) / 1.5
    assert layer_shift(H3, PAPER) == pytest.approx(expected)
    # window of one difference: only the last one
    assert layer_shift(H3, SpectralConfig.paper(t0=1)) == pytest.approx(0.4 / 3)
    # expanding spectrum -> negative shift
    assert layer_shift(list(reversed(H3)), PAPER) < 0


def test_eq4_rank_mode_uses_compression_fraction():
    c = [math.log(3 / s) / math.log(3) for s in (2.0, 1.7, 1.3)]
    expected = (0.5 * (c[1] - c[0]) + 1.0 * (c[2] - c[1])) / 1.5
    assert layer_shift(H3, SpectralConfig(t0=5)) == pytest.approx(expected)


def _top(width: int, k: int) -> torch.Tensor:
    """k singular values of 1, the rest 0: effective dimension d = Σσ = k."""
    s = torch.zeros(width, dtype=torch.float64)
    s[:k] = 1.0
    return s


def test_target_rank_compression_peaks_at_the_target():
    cfg = SpectralConfig(t0=5, target_rank=9)
    # d = q: full compression; d = r (flat): none
    assert layer_compression([_top(64, 9)], cfg) == pytest.approx(math.e)
    assert layer_compression([torch.ones(64)], cfg) == pytest.approx(1.0)
    # d = 3 < q = 9: c = 1 - log 3 / log(64/9) = 0.4388..., more collapsed than the target
    c3 = 1 - math.log(9 / 3) / math.log(64 / 9)
    assert layer_compression([_top(64, 3)], cfg) == pytest.approx(math.exp(c3))
    # rank one: c = 1 - log 9 / log(64/9) < 0 is clipped to 0 (as far off as a flat spectrum) ...
    assert 1 - math.log(9) / math.log(64 / 9) < 0
    assert layer_compression([_top(64, 1)], cfg) == pytest.approx(1.0)
    # ... but moving from rank one towards the target is progress (the unclipped c, eq. 4)
    c1 = 1 - math.log(9) / math.log(64 / 9)
    assert layer_shift([_top(64, 1), _top(64, 3)], cfg) == pytest.approx(c3 - c1)
    assert layer_shift([_top(64, 9), _top(64, 3)], cfg) == pytest.approx(c3 - 1.0)
    # q is capped at r - 1: an 8-unit layer with target 9 compresses towards 7
    assert layer_compression([_top(8, 7)], cfg) == pytest.approx(math.e)
    # a narrow layer (r < 2q): c(d=1) = -19.9 and c(d=2) = -13.3 are both clamped at -1,
    # so one layer cannot dominate the shift (unclamped it would be +6.6 per round)
    assert layer_shift([_top(10, 1), _top(10, 2)], cfg) == pytest.approx(0.0)


def test_eq4_needs_two_rounds():
    assert math.isnan(layer_shift(H3[:1], PAPER))
    assert math.isnan(shift_score([[H3[0]]], PAPER))


def test_eq5_averages_layers():
    flat = [torch.ones(3)] * 3
    hist = [[a, b] for a, b in zip(H3, flat, strict=True)]
    assert shift_score(hist, PAPER) == pytest.approx(layer_shift(H3, PAPER) / 2)


# ---------------------------------------------------------------- eq. (6), (7), (8)
def test_eq6_combined_score():
    assert combined_score(1.8, 0.001, 3.5e3) == pytest.approx(math.log(1.8) + 3.5)
    assert combined_score(0.5, 0.0, 1.0) == pytest.approx(math.log(2.0))  # |log|
    assert math.isnan(combined_score(1.8, float("nan"), 1.0))


def test_eq7_saturation_rule():
    cfg = SpectralConfig.paper(t2=1.5, delta=1e-4)
    assert is_saturated(1.8, 5e-5, 1.5, 1e-4)
    assert final_score(1.8, 5e-5, cfg) == 0.0
    assert final_score(1.8, 2e-4, cfg) == pytest.approx(math.log(1.8) + 3.5e3 * 2e-4)
    assert final_score(1.2, 5e-5, cfg) == pytest.approx(math.log(1.2) + 3.5e3 * 5e-5)


def test_eq8_predicted_accuracy():
    cfg = SpectralConfig.paper(t2=100.0)
    s_t = math.log(1.8) + 3.5e3 * 0.001
    gamma = 2e-4 * 0.6 * 3
    assert final_score_with_accuracy(1.8, 0.001, 0.6, 3, cfg) == pytest.approx(0.6 * (1 + gamma * s_t))
    # the min() caps the prediction at 1
    assert final_score_with_accuracy(1.8, 1.0, 0.6, 30, cfg) == pytest.approx(1.0)
    # saturated: the prediction is v_t itself
    sat = SpectralConfig.paper(t2=1.0, delta=0.01)
    assert final_score_with_accuracy(1.8, 0.001, 0.6, 3, sat) == pytest.approx(0.6)
    assert final_score_with_accuracy(1.8, 0.001, 0.0, 3, cfg) == 0.0
    assert math.isnan(final_score_with_accuracy(1.8, 0.001, float("nan"), 3, cfg))
    with pytest.raises(ValueError, match="fraction"):
        final_score_with_accuracy(1.8, 0.001, 60.0, 3, cfg)


def test_compute_scores_matches_the_parts():
    hist = [[s] for s in H3]
    sc = compute_scores(hist, epoch=3, v_t=0.6, config=SpectralConfig.paper(t2=100.0))
    assert sc.s_o == pytest.approx(9 / 5)
    assert sc.s_s == pytest.approx((0.5 * 0.1 + 0.4 / 3) / 1.5)
    assert sc.s_t == pytest.approx(math.log(1.8) + 3.5e3 * sc.s_s)
    assert sc.s_F == pytest.approx(sc.s_t)
    assert sc.s_Fv == pytest.approx(0.6 * (1 + min(0.4 / 0.6, 2e-4 * 0.6 * 3 * sc.s_t)))
    assert sc.rounds == 3 and sc.layers == 1


def test_rank_normalisation_makes_widths_comparable():
    # the same power-law decay σ_i = 1/i in a 512- and a 256-wide layer
    def scores(width: int, cfg: SpectralConfig) -> float:
        s = 1.0 / torch.arange(1, width + 1, dtype=torch.float64)
        return abs(math.log(layer_compression([s], cfg)))

    paper_gap = abs(scores(512, PAPER) - scores(256, PAPER))
    rank_gap = abs(scores(512, SpectralConfig()) - scores(256, SpectralConfig()))
    assert rank_gap < 0.1 * paper_gap


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="t0 must be an integer >= 1"):
        SpectralConfig(t0=0)
    with pytest.raises(ValueError, match="'paper' or 'rank'"):
        SpectralConfig(normalize="width")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta must be > 0"):
        SpectralConfig(beta=0.0)
    for bad in (0, 2.5, True, float("nan")):
        with pytest.raises(ValueError, match="target_rank must be an integer >= 1"):
            SpectralConfig(target_rank=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs normalize='rank'"):
        SpectralConfig.paper(target_rank=9)


# ---------------------------------------------------------------- the decision on scripted spectra
def _power(width: int, p: float) -> torch.Tensor:
    return torch.arange(1, width + 1, dtype=torch.float64) ** (-p)


CFG = SpectralConfig(t0=4, eta=20.0, t2=2.0, delta=1e-3, t1=0.25)


def test_compressing_spectra_continue():
    hist = [[_power(64, 0.1 + 0.08 * k), _power(32, 0.1 + 0.08 * k)] for k in range(8)]
    d = decide(compute_scores(hist, 8, 0.5, CFG), t1=CFG.t1)
    assert not d.give_up and d.kind == "continue"


def test_flat_spectra_give_up():
    hist = [[torch.ones(64, dtype=torch.float64), torch.ones(32, dtype=torch.float64)] for _ in range(8)]
    sc = compute_scores(hist, 8, None, CFG)
    assert sc.s_F == pytest.approx(0.0)
    d = decide(sc, t1=CFG.t1)
    assert d.give_up and d.kind == "fail" and "s_F=0 < t1=0.25" in d.reason


def test_saturated_spectra_stop_unless_already_good():
    hist = [[_power(64, 3.0), _power(32, 3.0)] for _ in range(8)]
    sc = compute_scores(hist, 8, 0.9, CFG)
    assert sc.saturated and sc.s_F == 0.0 and sc.s_Fv == pytest.approx(0.9)
    d = decide(sc, t1=CFG.t1)
    assert d.give_up and d.kind == "saturated"
    assert not decide(sc, t1=CFG.t1, keep_above=0.8).give_up


def test_target_on_predicted_accuracy():
    hist = [[_power(64, 0.1 + 0.08 * k)] for k in range(8)]
    sc = compute_scores(hist, 8, 0.3, CFG)
    assert decide(sc, t1=CFG.t1, target=0.9).kind == "below_target"
    assert not decide(sc, t1=CFG.t1, target=0.2).give_up


def test_short_history_dead_and_nan_spectra():
    assert decide(compute_scores([[_power(8, 1.0)]], 1, None, CFG)).kind == "insufficient"
    dead = [[torch.zeros(8, dtype=torch.float64)] for _ in range(4)]
    assert decide(compute_scores(dead, 4, None, CFG)).kind == "dead"
    nan = [[torch.full((8,), float("nan"), dtype=torch.float64)] for _ in range(4)]
    d = decide(compute_scores(nan, 4, 0.5, CFG))
    assert d.give_up and d.kind == "nonfinite"
    # a window longer than the history uses what there is
    sc = compute_scores([[_power(8, 0.5)], [_power(8, 0.7)]], 2, None, SpectralConfig(t0=50))
    assert sc.rounds == 2 and math.isfinite(sc.s_F)
