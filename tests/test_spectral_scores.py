"""Eq. (2)–(8) of the DAI paper against hand-computed values, and the give-up rule."""

from __future__ import annotations

import math
from dataclasses import replace

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
    d = decide(compute_scores(hist, 8, 0.5, CFG), CFG)
    assert not d.give_up and d.kind == "continue"


def test_flat_spectra_give_up():
    hist = [[torch.ones(64, dtype=torch.float64), torch.ones(32, dtype=torch.float64)] for _ in range(8)]
    sc = compute_scores(hist, 8, None, CFG)
    assert sc.s_F == pytest.approx(0.0)
    d = decide(sc, CFG)
    assert d.give_up and d.kind == "fail" and "s_F=0 < t1=0.25" in d.reason


def test_saturated_spectra_stop_unless_already_good():
    hist = [[_power(64, 3.0), _power(32, 3.0)] for _ in range(8)]
    sc = compute_scores(hist, 8, 0.9, CFG)
    assert sc.saturated and sc.s_F == 0.0 and sc.s_Fv == pytest.approx(0.9)
    d = decide(sc, CFG)
    assert d.give_up and d.kind == "saturated"
    assert not decide(sc, CFG, keep_above=0.8).give_up


def test_target_on_predicted_accuracy():
    hist = [[_power(64, 0.1 + 0.08 * k)] for k in range(8)]
    sc = compute_scores(hist, 8, 0.3, CFG)
    assert decide(sc, CFG, target=0.9).kind == "below_target"
    assert not decide(sc, CFG, target=0.2).give_up


def test_short_history_dead_and_nan_spectra():
    short = decide(compute_scores([[_power(8, 1.0)]], 1, None, CFG), CFG)
    assert short.kind == "insufficient" and not short.final
    dead = [[torch.zeros(8, dtype=torch.float64)] for _ in range(4)]
    assert decide(compute_scores(dead, 4, None, CFG), CFG).kind == "dead"
    nan = [[torch.full((8,), float("nan"), dtype=torch.float64)] for _ in range(4)]
    d = decide(compute_scores(nan, 4, 0.5, CFG), CFG)
    assert d.give_up and d.kind == "diverged"
    # a window longer than the history uses what there is
    sc = compute_scores([[_power(8, 0.5)], [_power(8, 0.7)]], 2, None, SpectralConfig(t0=50))
    assert sc.rounds == 2 and math.isfinite(sc.s_F)


# ---------------------------------------------------------------- regressions of issue #12
def test_small_repeated_activations_give_a_finite_spectrum():
    """Measured: eigh failed ('ill-conditioned') on small finite activations (max 0.012)."""
    g = torch.Generator().manual_seed(3)
    a = 0.012 * torch.relu(torch.randn(300, 80, generator=g))
    a[:, 40:] = a[:, :1]  # 40 identical columns: repeated (zero) singular values
    ref = torch.linalg.svdvals(a.double())
    s = spectrum_of(a)
    assert s.finite and torch.allclose(s.values, ref / ref[0], atol=1e-7)
    assert s.scale == pytest.approx(float((a.double() - a.double().mean(0)).square().mean().sqrt()), rel=1e-9)


def test_decomposition_falls_back_when_the_fast_paths_fail(monkeypatch):
    a = torch.relu(torch.randn(200, 70, generator=torch.Generator().manual_seed(2)))
    ref = torch.linalg.svdvals(a.double())

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("ill-conditioned")

    monkeypatch.setattr(torch.linalg, "eigvalsh", broken)
    assert torch.allclose(normalized_singular_values(a), ref / ref[0], atol=1e-10)  # svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", broken)
    assert torch.allclose(normalized_singular_values(a), ref / ref[0], atol=1e-10)  # scipy gesvd


def test_constant_output_is_a_dead_layer():
    a = torch.ones(20, 6) * torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0, 0.1])
    s = spectrum_of(a)
    assert s.dead and s.scale == 0.0 and float(s.values.max()) == 0.0


def _frozen(width: int, p: float, rounds: int, growth: float) -> tuple[list, list]:
    spectra = [[_power(width, p)] for _ in range(rounds)]
    scales = [[0.01 * (1.0 + growth) ** k] for k in range(rounds)]
    return spectra, scales


def test_growing_activation_scale_is_not_saturated():
    """Measured: late learners (chance at epoch 10, 0.99 at the end) stopped as 'saturated'. A
    compressed spectrum whose scale still grows 20 % per round is a representation that is changing."""
    cfg = SpectralConfig()
    spectra, scales = _frozen(64, 3.0, 6, growth=0.2)
    sc = compute_scores(spectra, 10, 0.1, cfg, scales=scales)
    assert sc.drift == pytest.approx(math.log(1.2)) and not sc.saturated and not sc.stalled
    assert not decide(sc, cfg).give_up
    # the same spectra with a constant scale: saturated (eq. 7) and given up
    spectra, scales = _frozen(64, 3.0, 6, growth=0.0)
    sc = compute_scores(spectra, 10, 0.1, cfg, scales=scales)
    assert sc.saturated and sc.s_F == 0.0
    assert decide(sc, cfg).kind == "saturated"


def test_stuck_run_below_t2_is_stalled():
    """Measured: a dead MLP on two shells (0.52 accuracy) scored s_F = 0.459 >= t1 = 0.45 and was kept.
    A spectrum that neither moves nor changes scale is stalled, whatever its compression."""
    cfg = SpectralConfig()
    spectra, scales = _frozen(64, 0.7, 6, growth=0.0)
    sc = compute_scores(spectra, 10, 0.52, cfg, scales=scales)
    assert not sc.saturated and sc.s_F > cfg.t1 and sc.stalled
    d = decide(sc, cfg)
    assert d.give_up and d.kind == "stalled"
    # kept when its accuracy shows it converged at a good solution
    assert decide(compute_scores(spectra, 10, 0.97, cfg, scales=scales), cfg, keep_above=0.75).kind == "converged"


def test_nan_round_after_finite_ones_is_diverged():
    """Measured: NaN for three rounds gave 'insufficient' (one finite round in the window hid them)."""
    nan = torch.full((8,), float("nan"), dtype=torch.float64)
    hist = [[_power(8, 0.5)], [nan], [nan], [nan]]
    d = decide(compute_scores(hist, 4, None, CFG), CFG)
    assert d.give_up and d.kind == "diverged" and d.final


def test_soft_cap_keeps_the_ranking_of_s_fv():
    """Measured: s_Fv hit its cap of 1.000 in 22 of 29 runs. The soft cap is strictly increasing in
    s_t, below 1, and equal to the paper's v_t (1 + γ s_t) to first order."""
    soft = SpectralConfig(t2=100.0, gamma_scale=0.5)
    paper = replace(soft, cap="paper")
    shifts = [0.0, 0.01, 0.05, 0.2, 1.0]
    values = [final_score_with_accuracy(1.5, s, 0.5, 10, soft) for s in shifts]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)) and values[-1] < 1.0
    capped = [final_score_with_accuracy(1.5, s, 0.5, 10, paper) for s in shifts]
    assert capped[-1] == capped[-2] == 1.0  # the paper's cap ties them
    tiny = SpectralConfig(t2=100.0, gamma_scale=1e-6)
    s_t = combined_score(1.5, 0.01, tiny.eta)
    assert final_score_with_accuracy(1.5, 0.01, 0.5, 10, tiny) == pytest.approx(0.5 * (1 + 1e-6 * 0.5 * 10 * s_t))
    # a negative s_t predicts a drop, still in [0, v_t]
    assert 0.0 < final_score_with_accuracy(1.01, -1.0, 0.5, 10, soft) < 0.5


def test_decide_takes_its_thresholds_from_the_config():
    hist = [[_power(64, 0.1 + 0.02 * k)] for k in range(6)]
    sc = compute_scores(hist, 6, None, CFG)
    assert 0.25 <= sc.s_F
    assert not decide(sc, CFG).give_up
    assert decide(sc, replace(CFG, t1=sc.s_F + 0.1)).kind == "fail"
