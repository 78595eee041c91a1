"""Predicted (with band) vs. real loss curves as a matplotlib figure / PNG.

matplotlib is optional (the ``plots`` extra): :func:`matplotlib_available` tells whether it
is installed, and :func:`plot_prediction` raises an ``ImportError`` that says how to get
it. Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no GUI
backend), so plotting is safe in worker processes and headless servers.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["matplotlib_available", "plot_give_up", "plot_prediction", "save_figure"]


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the ``plots`` extra is installed)."""
    return importlib.util.find_spec("matplotlib") is not None


def _require_matplotlib() -> None:
    if not matplotlib_available():
        raise ImportError(
            "plotting needs matplotlib: `pip install lightning_ttp[plots]` (or `pip install matplotlib`)."
        )


def plot_prediction(
    steps: Sequence[int] | np.ndarray,
    predicted: Sequence[float] | np.ndarray,
    *,
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    real_steps: Sequence[int] | np.ndarray | None = None,
    real: Sequence[float] | np.ndarray | None = None,
    real_smoothed: Sequence[float] | np.ndarray | None = None,
    refined: Sequence[float] | np.ndarray | None = None,
    training_times: Mapping[str, float | int | None] | None = None,
    title: str = "Predicted vs. real training loss",
    ylabel: str = "training loss",
    log_y: bool = False,
) -> Any:
    """A figure of the predicted loss (with its band) against the real one.

    Args:
        steps, predicted: the predicted expected loss per optimiser step.
        band: ``(low, high)`` predicted band (shaded).
        real_steps, real: the observed (per-step, possibly noisy) training loss.
        real_smoothed: the real curve after the smoothing used to measure its training time.
        refined: the closed-loop refined prediction, if any.
        training_times: vertical markers, e.g. ``{"predicted T(10%)": 85, "real T(10%)": 91}``.
        log_y: log-scale loss axis.

    Returns:
        A ``matplotlib.figure.Figure`` (save it with :func:`save_figure` or ``fig.savefig``).
    """
    _require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    steps_arr = np.asarray(steps)
    if band is not None:
        ax.fill_between(steps_arr, np.asarray(band[0]), np.asarray(band[1]), color="tab:blue", alpha=0.2,
                        label="predicted band", linewidth=0)
    ax.plot(steps_arr, np.asarray(predicted), color="tab:blue", label="predicted (open loop)")
    if refined is not None:
        ax.plot(steps_arr[: len(refined)], np.asarray(refined), color="tab:green", linestyle="--",
                label="predicted (refined)")
    if real is not None:
        rs = np.arange(len(real)) if real_steps is None else np.asarray(real_steps)
        ax.plot(rs, np.asarray(real), color="tab:orange", alpha=0.35 if real_smoothed is not None else 1.0,
                linewidth=0.8, label="real")
        if real_smoothed is not None:
            ax.plot(rs, np.asarray(real_smoothed), color="tab:orange", label="real (smoothed)")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:gray"]
    for i, (label, t) in enumerate((training_times or {}).items()):
        if t is not None:
            ax.axvline(float(t), color=colors[i % len(colors)], linestyle=":", linewidth=1.0, label=label)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str]) -> str:
    """Save ``fig`` as PNG at ``path`` (parent folders created); returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_give_up(
    history: Sequence[Mapping[str, Any]],
    *,
    t1: float,
    checkpoint_epoch: int,
    decision_epoch: int | None = None,
    decision: str | None = None,
    title: str = "Early give-up: DAI scores per validation round",
) -> Any:
    """A figure of the give-up scores per validation round (``EarlyGiveUp.history``).

    Top: s_F (eq. 7) with the threshold t1, and s_Fv (eq. 8) with v_t when the accuracy is known.
    Bottom: the compression |log s_o| (eq. 2–3) and the shift η-free s_s (eq. 4–5). The
    checkpoint epoch and the decision (epoch and kind) are marked on both.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    _require_matplotlib()
    from matplotlib.figure import Figure

    epochs = np.array([float(h["epoch"]) for h in history])

    def col(key: str) -> np.ndarray:
        return np.array([float(h.get(key, np.nan)) for h in history])

    fig = Figure(figsize=(7.0, 5.6), dpi=110)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(epochs, col("s_F"), "o-", color="tab:blue", label="s_F (eq. 7)")
    top.axhline(t1, color="tab:blue", linestyle="--", linewidth=1.0, label=f"t1 = {t1:g}")
    acc = top.twinx()
    if np.isfinite(col("v_t")).any():
        acc.plot(epochs, col("s_Fv"), "s-", color="tab:green", label="s_Fv (eq. 8)")
        acc.plot(epochs, col("v_t"), "^:", color="tab:gray", label="v_t (val acc)")
        acc.set_ylim(0.0, 1.02)
        acc.set_ylabel("accuracy")
    else:
        acc.set_axis_off()
    top.set_ylabel("s_F")
    s_o = col("s_o")
    with np.errstate(invalid="ignore", divide="ignore"):
        bottom.plot(epochs, np.abs(np.log(s_o)), "o-", color="tab:purple", label="|log s_o| (eq. 2-3)")
    shift = bottom.twinx()
    shift.plot(epochs, col("s_s"), "d-", color="tab:orange", label="s_s (eq. 4-5)")
    shift.axhline(0.0, color="tab:orange", linewidth=0.6, alpha=0.5)
    shift.set_ylabel("s_s")
    bottom.set_ylabel("|log s_o|")
    bottom.set_xlabel("epoch (validation round)")
    for ax in (top, bottom):
        ax.axvline(checkpoint_epoch, color="black", linestyle=":", linewidth=1.0,
                   label=f"checkpoint ({checkpoint_epoch})")
        if decision_epoch is not None:
            ax.axvline(decision_epoch, color="tab:red", linewidth=1.2, alpha=0.7,
                       label=f"decision @ {decision_epoch}: {decision}")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (top, bottom, shift):
        ax.ticklabel_format(axis="y", useOffset=False)
    for ax, twin in ((top, acc), (bottom, shift)):
        handles = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels() if twin.axison else ([], [])
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower right", framealpha=0.85)
    top.set_title(title)
    fig.tight_layout()
    return fig
