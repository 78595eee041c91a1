"""What :class:`~lightning_ttp.callbacks.TrainingTimePredictor` tells the user: summaries,
the what-if table, the predicted curve in the loggers, the predicted-vs-real plot.

Functions of the predictor (read-only): the callback decides when to call them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from lightning_utilities.core.rank_zero import rank_zero_info

from ..dynamics import epsilon_training_time, still_falling
from ._compat import is_instance
from .eta import format_duration

__all__ = ["final_summary", "log_curve", "log_what_if", "save_plot", "summary", "what_if_text"]


def steps_text(steps: int | None) -> str:
    """A step count, or "never" for a curve that does not converge."""
    return "never" if steps is None else str(steps)


def _predicted_text(prediction: Any, eps: float, prefix: str = "") -> str:
    """``{prefix}412``, or "not converged within the run (≈ step 530 if it went on)"."""
    if prediction.converged_within_run(eps):
        return prefix + steps_text(prediction.training_time(eps))
    beyond = prediction.training_time_beyond(eps)
    later = "" if beyond is None else f" (≈ step {beyond} if it went on)"
    return f"not converged within the run{later}"


def summary(predictor: Any) -> str:
    """One paragraph: predicted steps to converge, cost, notes."""
    pred = predictor.prediction
    if pred is None:
        return "lightning_ttp: no prediction."
    plan = predictor.plan or {}
    loss = pred.loss
    used, drawn = pred.diagnostics.kernel_samples, plan.get("num_samples")
    kernel = f"{pred.diagnostics.kernel} kernel on {used} samples"
    if drawn is not None and used < drawn:
        kernel += f" of the {drawn} drawn (cost budget)"
    processes = int(pred.diagnostics.extra.get("processes", 1) or 1)
    if processes > 1:
        kernel += f" across {processes} processes"
    shares = [a for a in pred.diagnostics.extra.get("idiosyncratic_share") or [] if a > 0]
    if shares:
        kernel += (f", each sample's own term weighted {used}/{pred.diagnostics.dataset_size} on its "
                   f"unshared {max(shares):.0%}")
    parts = [
        f"lightning_ttp: predicted fine-tuning of {plan.get('steps', len(loss) - 1)} optimiser steps "
        f"(batch {plan.get('batch_size')} × accumulate {plan.get('accumulate_grad_batches')} × "
        f"{plan.get('world_size')} process(es); {kernel}):",
        f"loss {loss[0]:.4g} → " + ("diverges (see the notes)" if pred.diverged else f"{loss[-1]:.4g}"),
    ]
    if pred.loss_band is not None and not pred.diverged:
        parts[-1] += f" (band {pred.loss_band[0][-1]:.4g}–{pred.loss_band[1][-1]:.4g})"
    if pred.error is not None:
        parts.append(f"training error {pred.error[0]:.1%} → {pred.error[-1]:.1%}")
    parts.append("converges " + ", ".join(f"ε={e:g} {_predicted_text(pred, e, 'at step ')}"
                                          for e in predictor.epsilons))
    ahead = pred.diagnostics.get("lookahead")
    if ahead:
        parts.append(f"look-ahead of {ahead['steps']} real steps on the kernel subset: kernel scale ×"
                     f"{ahead['scale']:.2g}, loss {ahead['level_ratio']:.2g}× the linearised model's")
    if predictor.cost_seconds is not None:
        parts.append(f"prediction took {predictor.cost_seconds:.2f} s")
        if predictor.state.what_if:
            parts[-1] += f" (+ {predictor.what_if_seconds:.2f} s for the what-if table)"
    parts.append("ETA appears in the progress bar / logs after the first steps")
    text = parts[0] + " " + "; ".join(parts[1:]) + "."
    notes = [str(w) for w in pred.diagnostics.warnings]
    return text + (" Notes: " + " ".join(notes) if notes else "")


def _what_if_rows(predictor: Any) -> list[tuple[str, list[str], str]]:
    return [(row["setting"], [steps_text(row["steps_to_converge"].get(str(e))) for e in predictor.epsilons],
             f"{row.get('final_loss', float('nan')):.4g}") for row in predictor.what_if_table]


def what_if_text(predictor: Any) -> str:
    """The what-if table as plain text ("" without a what-if study)."""
    if not predictor.what_if_table:
        return ""
    header = "setting".ljust(22) + "".join(f"T(ε={e:g})".rjust(12) for e in predictor.epsilons) + "  final loss"
    lines = ["lightning_ttp what-if (same kernel, predicted optimiser steps to converge):", header]
    for setting, cells, final in _what_if_rows(predictor):
        lines.append(f"{setting:<22}" + "".join(c.rjust(12) for c in cells) + f"  {final}")
    return "\n".join(lines)


def log_what_if(predictor: Any, trainer: Any) -> None:
    """The what-if table as Markdown text on TensorBoard loggers (other loggers: printed only)."""
    rows = ["| setting | " + " | ".join(f"T(ε={e:g})" for e in predictor.epsilons) + " | final loss |",
            "|---|" + "---|" * (len(predictor.epsilons) + 1)]
    rows += [f"| {setting} | {' | '.join(cells)} | {final} |" for setting, cells, final in _what_if_rows(predictor)]
    for logger in trainer.loggers:
        if is_instance(logger, "loggers.TensorBoardLogger"):
            logger.experiment.add_text("ttp/what_if", "\n".join(rows), global_step=trainer.global_step)


def log_curve(predictor: Any, trainer: Any) -> None:
    """The predicted curve, at most ``max_curve_points`` evenly spaced steps, to every logger."""
    pred = predictor.prediction
    idx = np.arange(pred.loss.size)
    if idx.size > predictor.max_curve_points:
        idx = np.unique(np.linspace(0, idx.size - 1, predictor.max_curve_points).round().astype(int))
    for logger in trainer.loggers:
        for i in idx:
            metrics = {"ttp/predicted_loss": float(pred.loss[i])}
            if pred.loss_band is not None:
                metrics["ttp/predicted_loss_low"] = float(pred.loss_band[0][i])
                metrics["ttp/predicted_loss_high"] = float(pred.loss_band[1][i])
            if pred.error is not None:
                metrics["ttp/predicted_error"] = float(pred.error[i])
            # a diverging simulation: its finite start is logged, the non-finite rest is not (the note says why)
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
            if metrics:
                logger.log_metrics(metrics, step=int(pred.steps[i]) * predictor.step_unit)
        logger.save()


def final_summary(predictor: Any) -> str:
    """Predicted (open loop and refined) vs. real ε-training-time at the end of the fit."""
    pred = predictor.prediction
    if pred is None:
        return "lightning_ttp: no prediction."
    complete = predictor.run_complete()
    real_curve = predictor.real_curve() if complete else None
    lines = ["lightning_ttp: predicted vs. real training time (optimiser steps):"]
    for eps in predictor.epsilons:
        predicted = pred.training_time(eps)
        row = f"  ε={eps:g}: predicted {_predicted_text(pred, eps)}"
        if predictor.state.live_loss is not None or predictor.refinement is not None:
            row += f", closed loop {steps_text(epsilon_training_time(predictor.current_curve(), eps))}"
        if real_curve is None:
            row += ", real n/a (the run stopped before its planned steps)"
        elif still_falling(real_curve, eps):
            row += ", real: not converged within the run (still falling at the last step)"
        else:
            real = predictor.real_training_time(eps)
            row += f", real {steps_text(real)}"
            if real is not None and predicted is not None and pred.converged_within_run(eps):
                row += f" (open-loop error {abs(predicted - real) / max(real, 1):.0%})"
        lines.append(row)
    state = predictor.state
    if state.live_step is not None:
        lines.append(f"  closed loop: re-linearised last at step {state.live_step} ({state.live_seconds:.2f} s in all)")
    elif predictor.refine:
        lines.append("  closed loop: not re-linearised (the run ended before the loop's first step, was resumed from a "
                     "checkpoint, or the loop stopped: see the warnings); the curve was refitted to the observed "
                     "losses")
    sps = predictor.seconds_per_step()
    if sps is not None and predictor.fit_seconds() is not None:
        lines.append(f"  measured {sps * 1000:.1f} ms/step; fit took {format_duration(predictor.fit_seconds())}")
    return "\n".join(lines)


def save_plot(predictor: Any, trainer: Any, directory: str) -> str | None:
    """``ttp_prediction.png`` (predicted band and curve, real and smoothed loss, refined curve)
    in ``directory``; also added to TensorBoard loggers. ``None`` without matplotlib."""
    from ..report.plots import matplotlib_available, plot_prediction, save_figure

    if not matplotlib_available():
        predictor.warn_once("plot", "lightning_ttp: matplotlib is not installed; no plot (pip install matplotlib).")
        return None
    pred = predictor.prediction
    real = np.asarray(predictor.observed_losses) if predictor.observed_losses else None
    eps = predictor.epsilons[0]
    times: dict[str, float | int | None] = {f"predicted T(ε={eps:g})": pred.training_time(eps)}
    real_t = predictor.real_training_time(eps) if real is not None else None
    if real_t is not None:
        times[f"real T(ε={eps:g})"] = real_t
    fig = plot_prediction(
        pred.steps, pred.loss, band=pred.loss_band, real=real,
        real_smoothed=predictor.real_curve() if real is not None else None,
        refined=None if predictor.refinement is None and predictor.state.live_loss is None
        else predictor.current_curve(),
        training_times=times,
    )
    path = save_figure(fig, os.path.join(directory, "ttp_prediction.png"))
    for logger in trainer.loggers:
        if is_instance(logger, "loggers.TensorBoardLogger"):
            logger.experiment.add_figure("ttp/predicted_vs_real", fig, global_step=trainer.global_step)
    if predictor.verbose:
        rank_zero_info(f"lightning_ttp: plot saved to {path}")
    return path
