r"""The DAI compression scores, eq. (2)–(8) of Jain & Ramaswamy, "Predicting the success of
Gradient Descent for a particular Dataset-Architecture-Initialization (DAI)".

Notation: σ_{k l i} is the i-th normalised singular value (σ_{k l 1} = 1) of hidden layer l
at validation round k (see :mod:`lightning_ttp.spectral.spectra`); t is the current round;
the window is the last t0 rounds.

Choices where the paper is ambiguous (also in ``docs/give_up.md``)
-----------------------------------------------------------------
* **Window bounds.** Eq. (2) sums k = t−t0 … t (t0 + 1 spectra) but divides by t0; eq. (4)
  sums the t0 differences k = t−t0+1 … t but divides by t0 − 1. We use one window of the
  t0 + 1 spectra σ_{t−t0}, …, σ_t for both: eq. (2) becomes their *mean* (divide by
  (t0 + 1)·n_l) and eq. (4) the α-weighted *mean* of the t0 differences (divide by
  Σ_k α_k · n_l). α_k rises linearly: α_k = j / t0 for the j-th difference (j = 1 … t0),
  so it lies in (0, 1], the newest difference has weight 1 and none has weight 0.
* **Window longer than the history.** With fewer rounds than t0 + 1 the window is what
  there is. Eq. (4) needs two finite spectra; with fewer it is NaN and the decision rule
  says "insufficient history" instead of deciding.
* **n_l, the number of units averaged over** (``normalize``):

  - ``"paper"``: n_l = d_l as printed; with m < d_l the missing singular values count as
    zeros (a layer seen on few samples then looks compressed).
  - ``"rank"`` (our default): n_l = r_l = min(m, d_l), and both scores are put in units of
    the largest compression a layer of that rank can show, log r_l. With
    c = log(1 / mean σ) / log r_l ∈ [0, 1] (0: flat spectrum, 1: rank one),
    eq. (2) becomes s_olt = β · exp(c_window) so |log s_ot| ∈ [0, log β + 1]; and eq. (4)
    uses the per-round increase of c instead of the absolute decrease of σ:
    s_slt = Σ_k α_k (c_k − c_{k−1}) / Σ_k α_k, i.e. (σ̄_{k−1} − σ̄_k) / (σ̄ · log r_l) to first
    order. A 512-wide MLP layer and a 256-wide CNN dense layer then give scores in the same
    range (the paper's appendix A.1 reports they do not under ``"paper"``), and η reads as
    "how many rounds of the current trend to add". The defaults η, t1, t2, δ differ by mode;
    :meth:`SpectralConfig.paper` gives the paper's constants.
* **Target rank** (``target_rank``, ``"rank"`` mode only; our extension). The paper's
  premise, "successful training compresses the spectrum", was shown on two-class data, whose
  ideal representation has rank one. A k-class problem instead converges to k − 1
  well-separated directions (the simplex of "neural collapse", Papyan et al. 2020), and a
  layer that collapses to fewer is as bad as one that never compresses: on the digits
  population of the benchmark, s_F with rank one as the target is *anti*-correlated with
  success. Opt-in, ``SpectralConfig(target_rank=classes − 1)``: with target rank q and the effective dimension
  d = Σ_i σ_i = r · mean σ (σ_1 = 1), the compression fraction becomes
  c = 1 − |log(d / q)| / log(r / q), which is 1 at d = q and 0 at a flat spectrum; for q = 1
  it is exactly log(1 / mean σ) / log r. q is capped at r − 1. A layer far more collapsed than
  its target (d < q² / r) has c < 0: eq. (2) clips it to 0 (as far from the target as a flat
  spectrum), eq. (4) uses c clamped to [−1, 1] so that moving towards the target counts as
  progress but a narrow layer (r < 2q, where c is unbounded below) cannot dominate s_t.
* **t2 and δ** (eq. 7) are not given in the paper. Calibrated on the benchmark's held-out
  seeds (``benchmarks/give_up.py``), see :class:`SpectralConfig`.
* **Scale kept** (our extension). The normalisation σ / σ_1 removes the activation scale,
  so a late learner whose activations are still growing from a tiny initialisation looks as
  "frozen" as a dead run. With ``scales`` (the RMS activation of each layer and round,
  :attr:`Spectrum.scale`), the *drift* is the α-weighted mean over the window of
  |log rms_k − log rms_{k−1}|, averaged over layers: how fast the representation's size
  changes per round. A run with drift > ``drift_tol`` is *changing* and is never saturated
  (eq. 7/8) nor stalled. Without scales the drift is NaN and eq. (7) is the paper's.
* **Stalled** (our extension): |s_st| <= δ and drift <= ``drift_tol``: neither the shape nor
  the size of the spectrum moves any more. It covers the paper's saturated case and also a
  stuck run whose spectrum is not compressed enough to reach t2 (a dead initialisation on the
  two-shell data scores s_F = 0.46 and would otherwise pass any t1 below that).
* **Soft cap of eq. (8)** (``cap="soft"``, default). The paper's min((1 − v_t)/v_t, γ s_t)
  puts every run with γ s_t >= (1 − v_t)/v_t at exactly 1, which destroys the ranking that
  the Spearman evaluation measures (on a CNN population 22 of 29 runs sat at 1.000). We use
  s_Fv = v_t + (1 − v_t)(1 − exp(−v_t γ s_t / (1 − v_t))) for s_t >= 0 and v_t exp(γ s_t) for
  s_t < 0: equal to the paper's v_t (1 + γ s_t) to first order in γ s_t, strictly increasing
  in s_t and in v_t, and in [0, 1). ``cap="paper"`` is eq. (8) as printed.
* Dead layers (σ_1 = 0) and non-finite spectra are left out of the layer averages (eq. 3,
  5); their counts are reported so the decision rule can act on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

__all__ = [
    "SpectralConfig",
    "Scores",
    "alpha_weights",
    "layer_compression",
    "layer_shift",
    "compression_score",
    "shift_score",
    "combined_score",
    "is_saturated",
    "is_stalled",
    "layer_drift",
    "final_score",
    "final_score_with_accuracy",
    "compute_scores",
]

Normalize = Literal["paper", "rank"]
Cap = Literal["soft", "paper"]


@dataclass(frozen=True)
class SpectralConfig:
    """Hyper-parameters of eq. (2)–(8).

    Attributes:
        t0: window length in rounds (t0 differences over t0 + 1 spectra). Paper: not given.
        beta: β of eq. (2). Paper: 1.
        eta: η of eq. (6). Paper: 3.5e3 (with ``normalize="paper"``).
        t2: saturation threshold on s_ot in eq. (7)/(8). Paper: not given.
        delta: saturation threshold on s_st in eq. (7)/(8). Paper: not given.
        gamma_scale: γ = gamma_scale · v_t · t in eq. (8). Paper: 2e-4 (for its s_t of order 10^2;
            our ``"rank"`` s_t is of order 1).
        normalize: ``"rank"`` (default) or ``"paper"``, see the module docstring.
        t1: give-up threshold on s_F at the checkpoint. Paper: 0.25.
        target_rank: q, the rank a successful layer compresses towards (``"rank"`` mode). ``None``
            means 1, the paper's implicit target; classes − 1 for a k-class problem ranks runs
            better (see the module docstring) but is not calibrated as a default.
        drift_tol: a run whose activation scale changes by more than this (mean |Δ log rms| per
            round) is still changing: not saturated, not stalled. ``inf`` disables the guard.
        cap: ``"soft"`` (default) or ``"paper"``: the cap of eq. (8), see the module docstring.

    Defaults (``normalize="rank"``, target rank one, soft cap) were chosen on the pooled
    calibration seeds (1000) of ``benchmarks/give_up.py --quick`` (digits MLP, CNN and fine-tuned
    CNN populations with late learners; 60 epochs, decision at epoch 10), never on the evaluated
    seeds: the grid point and t1 with the most mean compute saved such that on every calibration
    population, for it and for a stricter neighbour (t1 + 0.1, δ and drift_tol doubled), at most
    5 % of the successful runs are killed → t0 = 3, η = 5, t2 = 2.2, δ = 3e-3, drift_tol = 0.01,
    t1 = 0; then gamma_scale = 0.001 (best mean Spearman of s_Fv at epoch 10). t1 = 0 means the
    calibrated rule gives up on dead, diverged, saturated and stalled runs only (eq. 7 and our
    guards): every t1 > 0 either failed the 5 % test (itself or its stricter neighbour) or saved
    less on the calibration seeds. See ``docs/give_up.md``.
    """

    t0: int = 3
    beta: float = 1.0
    eta: float = 5.0
    t2: float = 2.2
    delta: float = 3e-3
    gamma_scale: float = 0.001
    normalize: Normalize = "rank"
    t1: float = 0.0
    target_rank: int | None = None
    drift_tol: float = 0.01
    cap: Cap = "soft"

    def __post_init__(self) -> None:
        if int(self.t0) != self.t0 or self.t0 < 1:
            raise ValueError(
                f"SpectralConfig.t0 must be an integer >= 1 (rounds in the window), got {self.t0!r}"
            )
        if not self.beta > 0:
            raise ValueError(f"SpectralConfig.beta must be > 0 (it scales s_o, eq. 2), got {self.beta!r}")
        if self.normalize not in ("paper", "rank"):
            raise ValueError(f"SpectralConfig.normalize must be 'paper' or 'rank', got {self.normalize!r}")
        if self.target_rank is not None:
            q = self.target_rank
            if isinstance(q, bool) or not isinstance(q, int | float) or not math.isfinite(q) or int(q) != q or q < 1:
                raise ValueError(
                    f"SpectralConfig.target_rank must be an integer >= 1 (classes - 1) or None, "
                    f"got {self.target_rank!r}"
                )
            if self.normalize == "paper" and self.target_rank != 1:
                raise ValueError(
                    "SpectralConfig.target_rank != 1 needs normalize='rank'; the paper's normalisation "
                    "measures compression towards rank one only"
                )
        if self.cap not in ("soft", "paper"):
            raise ValueError(f"SpectralConfig.cap must be 'soft' or 'paper', got {self.cap!r}")
        if not self.drift_tol >= 0:
            raise ValueError(f"SpectralConfig.drift_tol must be >= 0 (inf disables it), got {self.drift_tol!r}")
        for name in ("eta", "t2", "delta", "gamma_scale", "t1"):
            if not math.isfinite(getattr(self, name)):
                value = getattr(self, name)
                raise ValueError(f"SpectralConfig.{name} must be a finite number, got {value!r}")

    @classmethod
    def paper(cls, **overrides: float | int | str) -> SpectralConfig:
        """The paper's constants: β = 1, η = 3.5e3, γ = 2e-4·v_t·t, t1 = 0.25, d_l-normalised.

        t0, t2 and δ are not in the paper; t0 = 5, t2 = 4 (mean σ <= 1/4) and δ = 1e-5 here are
        set by hand, not calibrated.
        """
        base = cls(
            t0=5, beta=1.0, eta=3.5e3, t2=4.0, delta=1e-5, gamma_scale=2e-4, normalize="paper", t1=0.25,
            drift_tol=math.inf, cap="paper",
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class Scores:
    """All scores of one round. NaN where a score is undefined (see the fields' notes)."""

    epoch: int
    s_o: float  # eq. (3)
    s_s: float  # eq. (5); NaN with fewer than two finite rounds
    s_t: float  # eq. (6)
    s_F: float  # eq. (7)
    s_Fv: float  # eq. (8); NaN without v_t
    v_t: float  # validation accuracy used in eq. (8), NaN if none
    saturated: bool
    rounds: int  # spectra in the window actually used
    layers: int
    dead_layers: int = 0
    nonfinite_layers: int = 0
    per_layer_o: list[float] = field(default_factory=list)
    per_layer_s: list[float] = field(default_factory=list)
    drift: float = float("nan")  # mean |Δ log rms| per round over the window; NaN without scales
    scale: float = float("nan")  # geometric mean over layers of the latest RMS activation
    stalled: bool = False  # |s_s| <= δ and drift <= drift_tol: the representation stopped moving
    per_layer_scale: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, float | int | bool | list[float]]:
        return dict(self.__dict__)


def alpha_weights(n: int) -> torch.Tensor:
    """α_k of eq. (4) for n differences, oldest first: j / n for j = 1 … n (in (0, 1])."""
    if n < 1:
        return torch.zeros(0, dtype=torch.float64)
    return torch.arange(1, n + 1, dtype=torch.float64) / n


def _stack(spectra: Sequence[torch.Tensor], units: int | None, normalize: Normalize) -> torch.Tensor:
    """Rounds x n_l float64 matrix: zero-padded (or cut) to d_l (paper) or to the rank (rank)."""
    lengths = [int(s.numel()) for s in spectra]
    if normalize == "paper":
        n = units if units is not None else max(lengths)
    else:
        n = min(max(lengths), units) if units is not None else max(lengths)
    out = torch.zeros(len(spectra), n, dtype=torch.float64)
    for i, s in enumerate(spectra):
        k = min(n, int(s.numel()))
        out[i, :k] = s.reshape(-1)[:k].to(torch.float64)
    return out


def _usable(spectra: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Finite, non-dead spectra (dead: largest value 0)."""
    return [s for s in spectra if s.numel() and bool(torch.isfinite(s).all()) and float(s.max()) > 0]


def _window(spectra: Sequence[torch.Tensor], t0: int) -> list[torch.Tensor]:
    return list(spectra)[-(t0 + 1) :]


def _compression_fraction(means: torch.Tensor, rank: int, target_rank: int | None) -> torch.Tensor:
    """c = 1 − |log(d / q)| / log(r / q) with d = r · mean σ and q = min(target_rank, r − 1),
    clamped to [−1, 1].

    For q = 1 this is log(1 / mean σ) / log r ∈ [0, 1]: 0 for a flat spectrum, 1 for rank one.
    NaN if r < 2.
    """
    if rank < 2:
        return torch.full_like(means, float("nan"))
    q = min(target_rank or 1, rank - 1)
    return (1.0 - torch.log(means * rank / q).abs() / math.log(rank / q)).clamp(min=-1.0)


def layer_compression(
    spectra: Sequence[torch.Tensor], config: SpectralConfig = SpectralConfig(), units: int | None = None
) -> float:
    r"""s_olt, eq. (2), for one layer; ``spectra`` is its history of normalised singular values.

    ``"paper"``: s_olt = β · n_l (t0 + 1) / Σ_{k=t−t0}^{t} Σ_i σ_{kli} = β / mean σ, n_l = d_l.
    ``"rank"``:  s_olt = β · exp(max(c, 0)), c the compression fraction of the window's mean σ
    towards ``config.target_rank`` (log(1 / mean σ) / log r_l for target rank one).
    The mean runs over the finite, non-dead spectra among the last t0 + 1 (fewer if the history
    is shorter). NaN if there is none, or (``"rank"``) if r_l = 1.
    """
    win = _usable(_window(spectra, config.t0))
    if not win:
        return float("nan")
    mat = _stack(win, units, config.normalize)
    mean = mat.mean()
    if config.normalize == "paper":
        return config.beta / float(mean)
    c = float(_compression_fraction(mean, mat.shape[1], config.target_rank))
    return config.beta * math.exp(max(c, 0.0)) if math.isfinite(c) else float("nan")


def layer_shift(
    spectra: Sequence[torch.Tensor], config: SpectralConfig = SpectralConfig(), units: int | None = None
) -> float:
    r"""s_slt, eq. (4), for one layer.

    ``"paper"``: s_slt = Σ_j α_j Σ_i (σ_{(k_j−1) l i} − σ_{k_j l i}) / (n_l Σ_j α_j), the
    α-weighted mean per-unit decrease over the t0 most recent differences, α_j = j / t0.
    ``"rank"``:  the same weighted mean of c_k − c_{k−1}, c_k the compression fraction of round k
    towards ``config.target_rank`` (log(1 / mean_i σ_{kli}) / log r_l for target rank one).
    Positive = the spectrum decays faster (compression). Differences are taken between
    consecutive usable (finite, non-dead) spectra. NaN with fewer than two.
    """
    win = _usable(_window(spectra, config.t0))
    if len(win) < 2:
        return float("nan")
    mat = _stack(win, units, config.normalize)
    means = mat.mean(dim=1)
    if config.normalize == "paper":
        diffs = means[:-1] - means[1:]
    else:
        c = _compression_fraction(means, mat.shape[1], config.target_rank)
        diffs = c[1:] - c[:-1]
    alpha = alpha_weights(int(diffs.numel()))
    return float((alpha * diffs).sum() / alpha.sum())


def _layer_histories(history: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    if not history:
        return []
    n_layers = len(history[-1])
    return [[rnd[l] for rnd in history if len(rnd) == n_layers] for l in range(n_layers)]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def compression_score(
    history: Sequence[Sequence[torch.Tensor]],
    config: SpectralConfig = SpectralConfig(),
    units: Sequence[int] | None = None,
) -> float:
    """s_ot, eq. (3): mean of s_olt over the layers with a defined value.

    ``history[k][l]`` is the spectrum of layer l at round k; ``units[l]`` = d_l (defaults to the
    spectrum length).
    """
    per = _layer_histories(history)
    u = [None if units is None else units[l] for l in range(len(per))]
    return _nanmean([layer_compression(h, config, u[l]) for l, h in enumerate(per)])


def shift_score(
    history: Sequence[Sequence[torch.Tensor]],
    config: SpectralConfig = SpectralConfig(),
    units: Sequence[int] | None = None,
) -> float:
    """s_st, eq. (5): mean of s_slt over the layers with a defined value."""
    per = _layer_histories(history)
    return _nanmean([layer_shift(h, config, None if units is None else units[l]) for l, h in enumerate(per)])


def combined_score(s_o: float, s_s: float, eta: float) -> float:
    """s_t = |log s_ot| + η · s_st, eq. (6)."""
    if not (math.isfinite(s_o) and s_o > 0 and math.isfinite(s_s)):
        return float("nan")
    return abs(math.log(s_o)) + eta * s_s


def _changing(drift: float, drift_tol: float) -> bool:
    return math.isfinite(drift) and drift > drift_tol


def is_saturated(
    s_o: float, s_s: float, t2: float, delta: float, drift: float = float("nan"), drift_tol: float = math.inf
) -> bool:
    """The saturation case of eq. (7)/(8): s_ot >= t2 and s_st <= δ (compressed, no longer moving),
    and (our guard) the activation scale not drifting by more than ``drift_tol`` per round."""
    return bool(
        math.isfinite(s_o) and math.isfinite(s_s) and s_o >= t2 and s_s <= delta and not _changing(drift, drift_tol)
    )


def is_stalled(s_s: float, delta: float, drift: float, drift_tol: float) -> bool:
    """|s_st| <= δ and drift <= ``drift_tol`` (both known): neither the spectrum's shape nor its size moves."""
    return bool(math.isfinite(s_s) and math.isfinite(drift) and abs(s_s) <= delta and drift <= drift_tol)


def final_score(
    s_o: float, s_s: float, config: SpectralConfig = SpectralConfig(), drift: float = float("nan")
) -> float:
    """s_F, eq. (7): 0 if saturated (s_ot >= t2 and s_st <= δ, not drifting), else s_t."""
    if is_saturated(s_o, s_s, config.t2, config.delta, drift, config.drift_tol):
        return 0.0
    return combined_score(s_o, s_s, config.eta)


def final_score_with_accuracy(
    s_o: float,
    s_s: float,
    v_t: float,
    epoch: int,
    config: SpectralConfig = SpectralConfig(),
    drift: float = float("nan"),
) -> float:
    r"""s_Fv, eq. (8): the predicted final validation accuracy.

    v_t if saturated; else, with x = γ s_t and γ = gamma_scale · v_t · t (t = ``epoch``, the
    number of completed training epochs):

    * ``cap="paper"``: v_t · (1 + min((1 − v_t) / v_t, x)), as printed;
    * ``cap="soft"``: v_t + (1 − v_t)(1 − exp(−v_t x / (1 − v_t))) for x >= 0, v_t · exp(x) for
      x < 0 (the same to first order in x, strictly monotone, never exactly 1).

    A negative s_t (expanding spectrum) predicts a drop below v_t. NaN if v_t or s_t is undefined.
    """
    if not math.isfinite(v_t):
        return float("nan")
    if not 0.0 <= v_t <= 1.0:
        raise ValueError(f"v_t must be an accuracy in [0, 1], got {v_t!r}; pass a fraction, not a percentage")
    if is_saturated(s_o, s_s, config.t2, config.delta, drift, config.drift_tol):
        return v_t
    s_t = combined_score(s_o, s_s, config.eta)
    if not math.isfinite(s_t):
        return float("nan")
    if v_t == 0.0:
        return 0.0
    x = config.gamma_scale * v_t * epoch * s_t
    if config.cap == "paper":
        return v_t * (1.0 + min((1.0 - v_t) / v_t, x))
    if x < 0:
        return v_t * math.exp(x)
    if v_t >= 1.0:
        return 1.0
    return v_t + (1.0 - v_t) * -math.expm1(-v_t * x / (1.0 - v_t))


def layer_drift(scales: Sequence[float], config: SpectralConfig = SpectralConfig()) -> float:
    """α-weighted mean of |log rms_k − log rms_{k−1}| over the window's consecutive positive,
    finite scales of one layer (the weights of eq. 4). NaN with fewer than two."""
    win = [float(x) for x in list(scales)[-(config.t0 + 1) :] if math.isfinite(x) and x > 0]
    if len(win) < 2:
        return float("nan")
    logs = torch.tensor(win, dtype=torch.float64).log()
    diffs = (logs[1:] - logs[:-1]).abs()
    alpha = alpha_weights(int(diffs.numel()))
    return float((alpha * diffs).sum() / alpha.sum())


def compute_scores(
    history: Sequence[Sequence[torch.Tensor]],
    epoch: int,
    v_t: float | None = None,
    config: SpectralConfig = SpectralConfig(),
    units: Sequence[int] | None = None,
    scales: Sequence[Sequence[float]] | None = None,
) -> Scores:
    """All of eq. (2)–(8) for the latest round of ``history`` (rounds x layers spectra).

    ``scales[k][l]``: the RMS activation of layer l at round k (:attr:`Spectrum.scale`), for the
    drift guard; without it the drift is NaN and eq. (7) is the paper's.
    """
    per = _layer_histories(history)
    u = [None if units is None else units[l] for l in range(len(per))]
    o = [layer_compression(h, config, u[l]) for l, h in enumerate(per)]
    s = [layer_shift(h, config, u[l]) for l, h in enumerate(per)]
    latest = history[-1] if history else []
    dead = sum(1 for x in latest if x.numel() and bool(torch.isfinite(x).all()) and float(x.max()) <= 0)
    nonfinite = sum(1 for x in latest if x.numel() == 0 or not bool(torch.isfinite(x).all()))
    s_o, s_s = _nanmean(o), _nanmean(s)
    drift, scale, per_scale = float("nan"), float("nan"), []
    if scales:
        per_sc = [[float(rnd[l]) for rnd in scales if len(rnd) == len(per)] for l in range(len(per))]
        drift = _nanmean([layer_drift(h, config) for h in per_sc])
        per_scale = [h[-1] if h else float("nan") for h in per_sc]
        logs = [math.log(x) for x in per_scale if math.isfinite(x) and x > 0]
        scale = math.exp(sum(logs) / len(logs)) if logs else float("nan")
    v = float("nan") if v_t is None else float(v_t)
    rounds = max((len(_usable(_window(h, config.t0))) for h in per), default=0)
    return Scores(
        epoch=epoch,
        s_o=s_o,
        s_s=s_s,
        s_t=combined_score(s_o, s_s, config.eta),
        s_F=final_score(s_o, s_s, config, drift),
        s_Fv=final_score_with_accuracy(s_o, s_s, v, epoch, config, drift),
        v_t=v,
        saturated=is_saturated(s_o, s_s, config.t2, config.delta, drift, config.drift_tol),
        rounds=rounds,
        layers=len(per),
        dead_layers=dead,
        nonfinite_layers=nonfinite,
        per_layer_o=o,
        per_layer_s=s,
        drift=drift,
        scale=scale,
        stalled=is_stalled(s_s, config.delta, drift, config.drift_tol),
        per_layer_scale=per_scale,
    )
