"""``TrainingTimePredictor``: predict how long the fine-tuning will take, before it starts.

The callback reads what the Trainer is about to do at ``on_fit_start``, asks the
prediction engine (:mod:`lightning_ttp.api`) for the loss curve of the linearised model,
logs it next to the real loss, keeps an ETA and refines the prediction from the real losses
as they arrive (:mod:`lightning_ttp.refine`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

from ..refine import Refinement, default_smoothing_window, epsilon_training_time, refine_curve, smooth_losses
from ._compat import bases
from ._trainer_state import (
    TrainingPlan,
    collect_plan,
    preserve_state,
    sample_training_subset,
    train_dataloader,
    unsupported_strategy,
)

__all__ = ["TrainingTimePredictor", "format_duration"]

_WHAT_IF_KEYS = ("lr", "batch_size", "momentum", "weight_decay")
OutputFn = Callable[[Any, Any], torch.Tensor]
TargetFn = Callable[[Any], torch.Tensor]


def _training_time(curve_owner: Any, eps: float) -> int | None:
    """``curve_owner.training_time(eps)`` as an int (None: the curve never converges)."""
    value = curve_owner.training_time(eps)
    return None if value is None else int(value)


def _fmt_steps(value: int | None) -> str:
    return "never" if value is None else str(value)


def _builtin(obj: Any) -> Any:
    """Plain python containers/scalars only, so a checkpoint loads with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, float, str)) else k: _builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    return obj


class _Ring:
    """Fixed-size float buffer (the last ``size`` values) with a cheap median."""

    def __init__(self, size: int) -> None:
        self._data = np.zeros(size, dtype=np.float64)
        self._count = 0

    def append(self, value: float) -> None:
        self._data[self._count % self._data.size] = value
        self._count += 1

    def extend(self, values: Sequence[float]) -> None:
        for value in values:
            self.append(value)

    def __len__(self) -> int:
        return min(self._count, self._data.size)

    def median(self) -> float | None:
        n = len(self)
        return float(np.median(self._data[:n])) if n else None


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` / ``m:ss`` (``"?"`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainingTimePredictor(*bases("Callback")):  # type: ignore[misc]
    """Predict the fine-tuning loss curve and time to converge at fit start; ETA while training.

    At ``on_fit_start`` the callback reads the Trainer's plan — a fixed seeded subset of
    the training data (from the DataLoader Lightning is about to use; it is loaded once
    and reused), the first optimiser and its param groups, the lr schedulers as Lightning
    will step them (``interval="step"`` or ``"epoch"``, ``frequency``),
    ``accumulate_grad_batches``, the number of processes and
    ``trainer.estimated_stepping_batches`` — computes the empirical NTK of the model on
    the subset once, and simulates the linearised training. The model's weights and
    train/eval modes, ``requires_grad`` flags, ``.grad`` buffers, the optimiser state and
    the torch/numpy/python RNG streams are left exactly as they were.

    Logged (rank zero, to every ``trainer.loggers``): the predicted curve at fit start for
    every step (``ttp/predicted_loss``, ``ttp/predicted_loss_low``,
    ``ttp/predicted_loss_high``, ``ttp/predicted_error``); during training every
    ``log_every_n_steps`` steps ``ttp/steps_to_converge_eps{ε}`` (refined) and
    ``ttp/eta_converge_seconds`` / ``ttp/eta_end_seconds``. A summary is printed at fit start
    and at fit end (predicted vs. real ε-training-time), plus a PNG plot.

    Args:
        loss: the training loss the LightningModule uses: ``"cross_entropy"``, ``"mse"``,
            ``"bce_with_logits"`` or a callable ``loss(outputs, targets)`` (mean over the batch).
        epsilons: relative tolerances ε for the ε-training-time (the first one is the headline
            "converges ≈ step ..."), each in (0, 1).
        num_samples: training samples in the kernel subset (more: more accurate, cost grows
            ~quadratically).
        steps: planned optimiser steps; default ``trainer.estimated_stepping_batches``
            (required for an ``IterableDataset`` without ``max_steps``).
        projection_dim, method, num_paths, seed: passed to the prediction engine.
        output_fn: ``output_fn(pl_module, batch) -> (N, C) logits`` when the batch is not
            ``(x, y)`` or the logits are not ``pl_module(x)``.
        target_fn: ``target_fn(batch) -> targets`` when the batch is not ``(x, y)``.
        what_if: alternative settings to predict with the same kernel, e.g.
            ``{"lr": [0.01, 0.1], "batch_size": [16, 64], "momentum": [0.0, 0.9]}``
            (one key varied at a time); table printed at fit start, see :attr:`what_if_table`.
        refine: refine the prediction from the observed losses (closed loop).
        refine_every: refine every this many optimiser steps (default: ~2 % of the run). The
            refinement is also time-budgeted: it never takes more than ``refine_budget`` of
            the training wall clock (one refit costs ~10–30 ms).
        refine_budget: maximal share of the wall clock spent refining (default 0.25 %).
        warmup_steps: optimiser steps ignored when measuring seconds per step.
        log_curve: write the predicted curve to the loggers at fit start.
        max_curve_points: at most this many points of the predicted curve are logged
            (evenly spaced, ends included; all steps when the run is shorter).
        plot: save ``ttp_prediction.png`` in the logger directory at fit end (needs matplotlib;
            also added to TensorBoard when a TensorBoardLogger is used).
        verbose: print the summaries (rank zero).
        strict: raise instead of warning when the prediction fails.
    """

    def __init__(
        self,
        *,
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
        epsilons: Sequence[float] = (0.1, 0.01),
        num_samples: int = 256,
        steps: int | None = None,
        projection_dim: int | None = None,
        method: str = "auto",
        num_paths: int = 8,
        seed: int = 0,
        output_fn: OutputFn | None = None,
        target_fn: TargetFn | None = None,
        what_if: Mapping[str, Sequence[float]] | None = None,
        refine: bool = True,
        refine_every: int | None = None,
        refine_budget: float = 0.0025,
        warmup_steps: int = 3,
        log_curve: bool = True,
        max_curve_points: int = 5000,
        plot: bool = True,
        verbose: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(loss, str) or callable(loss)):
            raise TypeError(f"loss must be a name like 'cross_entropy' or a callable, got {type(loss).__name__}.")
        eps = tuple(float(e) for e in epsilons)
        if not eps or any(not 0.0 < e < 1.0 for e in eps):
            raise ValueError(
                f"epsilons must be a non-empty sequence of values in (0, 1), e.g. (0.1, 0.01); got {epsilons!r}."
            )
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}.")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be None (use the Trainer's plan) or an int >= 1, got {steps!r}.")
        if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
            raise ValueError(f"projection_dim must be None (exact kernel) or an int >= 1, got {projection_dim!r}.")
        if not isinstance(num_paths, int) or num_paths < 1:
            raise ValueError(f"num_paths must be an int >= 1, got {num_paths!r}.")
        if not isinstance(method, str):
            raise TypeError(f"method must be a string such as 'auto', got {type(method).__name__}.")
        for name, fn in (("output_fn", output_fn), ("target_fn", target_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}.")
        if refine_every is not None and (not isinstance(refine_every, int) or refine_every < 1):
            raise ValueError(f"refine_every must be None or an int >= 1, got {refine_every!r}.")
        if not 0.0 < refine_budget <= 1.0:
            raise ValueError(f"refine_budget must be in (0, 1], got {refine_budget!r}.")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}.")
        if not isinstance(max_curve_points, int) or max_curve_points < 2:
            raise ValueError(f"max_curve_points must be an int >= 2, got {max_curve_points!r}.")
        self._what_if = self._validate_what_if(what_if)

        self.loss = loss
        self.epsilons = eps
        self.num_samples = num_samples
        self.steps = steps
        self.projection_dim = projection_dim
        self.method = method
        self.num_paths = num_paths
        self.seed = seed
        self.output_fn = output_fn
        self.target_fn = target_fn
        self.refine = refine
        self.refine_every = refine_every
        self.refine_budget = refine_budget
        self.warmup_steps = warmup_steps
        self.log_curve = log_curve
        self.max_curve_points = max_curve_points
        self.plot = plot
        self.verbose = verbose
        self.strict = strict

        self._prediction: Any = None
        self._extended: dict[str, Any] = {}
        #: (steps, param groups) learning rates the prediction assumed (set at fit start)
        self.lr_schedule: np.ndarray | None = None
        self._refinement: Refinement | None = None
        self._plan: dict[str, Any] | None = None
        self._what_if_table: list[dict[str, Any]] = []
        self._cost_seconds: float | None = None
        #: set by load_state_dict (a resume): the next fit keeps the restored prediction
        self._restored = False
        self._disabled_reason: str | None = None
        self._warned: set[str] = set()
        self._reset_run_state()
        self.observed_losses: list[float] = []

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_what_if(what_if: Mapping[str, Sequence[float]] | None) -> dict[str, list[float]]:
        if what_if is None:
            return {}
        if not isinstance(what_if, Mapping):
            raise TypeError("what_if must be a dict like {'lr': [0.01, 0.1], 'batch_size': [32]}.")
        out: dict[str, list[float]] = {}
        for key, values in what_if.items():
            if key not in _WHAT_IF_KEYS:
                raise ValueError(f"what_if key {key!r} is not supported; use one of {_WHAT_IF_KEYS}.")
            vals = [values] if isinstance(values, (int, float)) else list(values)
            if not vals:
                raise ValueError(f"what_if[{key!r}] is empty; give at least one value.")
            for v in vals:
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"what_if[{key!r}] must contain finite numbers >= 0, got {v!r}.")
                if key in ("lr", "batch_size") and v <= 0:
                    raise ValueError(f"what_if[{key!r}] values must be > 0, got {v!r}.")
                if key == "momentum" and v >= 1:
                    raise ValueError(f"what_if['momentum'] values must be in [0, 1), got {v!r}.")
            out[key] = [int(v) if key == "batch_size" else float(v) for v in vals]
        return out

    def _reset_run_state(self) -> None:
        self._pending: list[torch.Tensor] = []
        self._micro: list[torch.Tensor] = []
        self._last_global_step: int | None = None
        self._last_step_time: float | None = None
        self._step_times = _Ring(256)  # the last 256 step durations (seconds)
        self._steps_timed = 0
        self._sps_cache: tuple[int, float | None] = (-1, None)
        self._last_refined_at = -1
        self._next_refine_time = 0.0
        self._status_cache: tuple[Any, int, float, str | None] = (None, -1, 0.0, None)
        self._converge_cache: dict[float, int | None] = {}  # cleared when the curve changes
        self._fit_start_time: float | None = None

    # ------------------------------------------------------------------ public API
    @property
    def prediction(self) -> Any:
        """The open-loop :class:`~lightning_ttp.Prediction` (None before fit start or if it failed)."""
        return self._prediction

    @property
    def refinement(self) -> Refinement | None:
        """The closed-loop refinement from the observed losses (None until enough losses)."""
        return self._refinement

    @property
    def what_if_table(self) -> list[dict[str, Any]]:
        """Rows ``{"setting": "lr=0.1", "steps_to_converge": {ε: steps}}`` of the what-if study."""
        return list(self._what_if_table)

    @property
    def plan(self) -> dict[str, Any] | None:
        """What the Trainer was about to do when the prediction was made."""
        return None if self._plan is None else dict(self._plan)

    @property
    def planned_steps(self) -> int | None:
        return None if self._plan is None else int(self._plan["steps"])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(epsilons=self.epsilons, seed=self.seed, num_samples=self.num_samples)

    def converge_step(self, eps: float | None = None) -> int | None:
        """Predicted ε-training-time (refined when available) in optimiser steps."""
        eps = self.epsilons[0] if eps is None else eps
        source = self._refinement if self._refinement is not None else self._prediction
        if source is None:
            return None
        if eps not in self._converge_cache:  # O(T): once per prediction/refinement, not per step
            self._converge_cache[eps] = _training_time(source, eps)
        return self._converge_cache[eps]

    def seconds_per_step(self) -> float | None:
        """Median seconds per optimiser step after the warm-up steps (None before)."""
        n = self._steps_timed
        cached_n, cached = self._sps_cache
        # the median of the last 256 steps moves slowly: recompute every 16 new steps
        if cached_n >= 0 and (n == cached_n or (cached is not None and n - cached_n < 16)):
            return cached
        value = self._step_times.median()
        self._sps_cache = (n, value)
        return value

    def eta(self, global_step: int) -> dict[str, float | int | None]:
        """Steps and seconds remaining to convergence (headline ε) and to the end of the run."""
        converge = self.converge_step()
        sps = self.seconds_per_step()
        end = self.planned_steps
        to_converge = None if converge is None else max(0, converge - global_step)
        to_end = None if end is None else max(0, end - global_step)
        return {
            "converge_step": converge,
            "steps_to_converge": to_converge,
            "steps_to_end": to_end,
            "seconds_per_step": sps,
            "eta_converge_seconds": None if sps is None or to_converge is None else to_converge * sps,
            "eta_end_seconds": None if sps is None or to_end is None else to_end * sps,
        }

    def status_text(self, global_step: int) -> str | None:
        """``"converges ≈ step 412 · ETA 3:12 · run ends 9:40"`` (None without a prediction)."""
        if self._prediction is None:
            return None
        # the text is for humans: between refinements and while the measured sec/step is
        # unchanged, it is recomputed at most 4 times a second
        self.seconds_per_step()  # refreshes its own cache every 16 steps
        key = (id(self._refinement), self._sps_cache)
        now = time.perf_counter()
        cached_key, cached_step, cached_time, cached_text = self._status_cache
        if cached_key == key and (cached_step == global_step or now - cached_time < 0.25):
            return cached_text
        text = self._status_text(global_step)
        self._status_cache = (key, global_step, now, text)
        return text

    def _status_text(self, global_step: int) -> str | None:
        eta = self.eta(global_step)
        if eta["converge_step"] is None:
            return None
        parts = [f"converges ≈ step {eta['converge_step']}"]
        if eta["seconds_per_step"] is not None:
            parts.append(f"ETA {format_duration(eta['eta_converge_seconds'])}")
            parts.append(f"run ends {format_duration(eta['eta_end_seconds'])}")
        return " · ".join(parts)

    # ------------------------------------------------------------------ failure policy
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    def _fail(self, where: str, error: BaseException) -> None:
        if self.strict:
            raise error
        self._warn_once(
            where,
            f"lightning_ttp: {where} failed ({type(error).__name__}: {error}). Training continues without it; "
            "pass TrainingTimePredictor(strict=True) to make this an error.",
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._disabled_reason = None  # a reused callback: decided again for this Trainer
        reason = unsupported_strategy(trainer)
        if reason is not None:
            if self.strict:
                raise RuntimeError(f"TrainingTimePredictor cannot run: {reason}")
            self._disabled_reason = reason
            self._warn_once("strategy", f"lightning_ttp: TrainingTimePredictor is disabled: {reason}")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()
        self._fit_start_time = time.perf_counter()
        restored, self._restored = self._restored, False
        if self._disabled_reason is not None:
            return
        if restored and self._prediction is not None:
            # resumed from a checkpoint: the weights are no longer the pre-trained ones, so
            # the prediction is kept, not recomputed
            if self.verbose:
                rank_zero_info("lightning_ttp: prediction restored from the checkpoint (not recomputed).")
            return
        # a new fit (also a second fit with the same callback): nothing of a previous one is kept
        self._clear_prediction()
        payload: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            # every rank loads its DataLoader (Lightning may synchronise there) and reads the plan
            loader = train_dataloader(trainer)
            plan = collect_plan(trainer, loader, self.steps)
            self.lr_schedule = plan.lr_schedule
        except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
            loader, plan, error = None, None, exc
        if trainer.is_global_zero and error is None:
            try:
                payload = self._compute(trainer, pl_module, loader, plan)
            except Exception as exc:  # noqa: BLE001
                error = exc
                payload = {"error": f"{type(exc).__name__}: {exc}"}
        if trainer.world_size > 1:
            # rank zero computed; every rank receives the same prediction (or the same failure)
            payload = trainer.strategy.broadcast(payload, src=0)
        if error is not None:
            self._fail("training-time prediction", error)
            return
        if payload is None or "error" in payload:
            message = "unknown error" if payload is None else payload["error"]
            self._fail("training-time prediction (on rank zero)", RuntimeError(message))
            return
        self._load_payload(payload)
        if trainer.is_global_zero:
            self._report_fit_start(trainer)

    def _report_fit_start(self, trainer: Any) -> None:
        """Log and print the prediction (rank zero); a failure here never stops training."""
        if self.log_curve:
            try:
                self._log_curve(trainer)
            except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
                self._fail("logging to the loggers", exc)
        if self._what_if_table:
            try:
                self._log_what_if(trainer)
            except Exception as exc:  # noqa: BLE001
                self._fail("logging the what-if table", exc)
        if self.verbose:
            try:
                rank_zero_info(self.summary())
                if self._what_if_table:
                    rank_zero_info(self.what_if_text())
            except Exception as exc:  # noqa: BLE001
                self._fail("the fit-start summary", exc)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._prediction is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            if getattr(pl_module, "automatic_optimization", True) and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
            self._micro.append(loss.detach())
        step = trainer.global_step
        if self._last_global_step is None:  # defensive: on_train_start normally sets it
            self._last_global_step = step
        if step == self._last_global_step:
            return  # the optimiser has not stepped yet: accumulating micro-batches
        self._last_global_step = step
        now = time.perf_counter()
        if self._micro:
            self._pending.append(self._micro[0] if len(self._micro) == 1 else torch.stack(self._micro).mean())
            self._micro = []
        if self._last_step_time is not None:
            self._steps_timed += 1
            if self._steps_timed > self.warmup_steps:
                self._step_times.append(now - self._last_step_time)
        self._last_step_time = now
        every = self.refine_every or max(1, self.planned_steps // 50 if self.planned_steps else 10)
        if self.refine and step - self._last_refined_at >= every and now >= self._next_refine_time:
            self._last_refined_at = step
            self._refine_now()
            # time budget: wait cost/budget seconds before the next refit
            self._next_refine_time = now + (time.perf_counter() - now) / self.refine_budget
        if trainer.is_global_zero and step % max(1, trainer.log_every_n_steps) == 0:
            try:
                self._log_progress(trainer, step)
            except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
                self._fail("logging to the loggers", exc)  # warned once with the curve

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # optimiser steps are counted from here: global_step changes after each one
        self._last_global_step = trainer.global_step
        self._last_step_time = time.perf_counter()
        # a refit costs ~10-30 ms: the first one waits until that is within the time budget
        self._next_refine_time = self._last_step_time + 0.02 / self.refine_budget

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._prediction is None:
            return
        try:
            self._flush()
            if self.refine:
                self._refine_now()
            if trainer.is_global_zero:
                if self.verbose:
                    rank_zero_info(self.final_summary())
                if self.plot:
                    self._save_plot(trainer)
        except Exception as exc:  # noqa: BLE001
            self._fail("the end-of-fit report", exc)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        try:
            return self._state_dict()
        except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
            self._fail("saving the prediction in the checkpoint", exc)
            return {}  # the checkpoint is still written; a resume from it recomputes the prediction

    def _state_dict(self) -> dict[str, Any]:
        self._flush()
        return _builtin({
            "prediction": None if self._prediction is None else self._prediction.to_dict(),
            "refinement": None if self._refinement is None else self._refinement.to_dict(),
            "extended": self._extended,
            "plan": self._plan,
            "what_if": self._what_if_table,
            "cost_seconds": self._cost_seconds,
            "observed_losses": list(self.observed_losses),
            "epsilons": list(self.epsilons),
        })

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from ._engine import prediction_from_dict

        data = state_dict.get("prediction")
        self._prediction = None if data is None else prediction_from_dict(data)
        self._converge_cache.clear()
        self._extended = dict(state_dict.get("extended") or {})
        ref = state_dict.get("refinement")
        self._refinement = None if ref is None else Refinement.from_dict(ref)
        self._plan = state_dict.get("plan")
        self._what_if_table = list(state_dict.get("what_if") or [])
        self._cost_seconds = state_dict.get("cost_seconds")
        self.observed_losses = [float(x) for x in state_dict.get("observed_losses") or []]
        self._restored = True

    # ------------------------------------------------------------------ computation (rank zero)
    def _split_batch(self, batch: Any) -> tuple[Any, Any]:
        """(what output_fn / the model gets, targets) of the subset batch."""
        targets = (
            self.target_fn(batch)
            if self.target_fn is not None
            else _xy_part(batch, 1, "targets", "output_fn=lambda module, batch: ..., target_fn=lambda batch: ...")
        )
        inputs = (
            batch
            if self.output_fn is not None
            else _xy_part(batch, 0, "model inputs", "output_fn=lambda module, batch: module(...) (and target_fn=...)")
        )
        return inputs, targets

    def _compute(self, trainer: Any, pl_module: Any, loader: Any, plan: TrainingPlan) -> dict[str, Any]:
        from lightning_fabric.utilities.apply_func import move_data_to_device

        from . import _engine

        start = time.perf_counter()
        with preserve_state(pl_module):
            batch, n = sample_training_subset(loader, self.num_samples, self.seed)
            batch = move_data_to_device(batch, pl_module.device)
            inputs, targets = self._split_batch(batch)
            output_fn = None
            if self.output_fn is not None:
                user_fn = self.output_fn

                def output_fn(model: Any, data: Any) -> torch.Tensor:
                    return user_fn(model, data)

            result = _engine.predict(
                pl_module,
                inputs,
                targets,
                trainer.optimizers[0],
                plan,
                loss=self.loss,
                output_fn=output_fn,
                projection_dim=self.projection_dim,
                method=self.method,
                num_paths=self.num_paths,
                seed=self.seed,
                what_if=self._what_if,
                epsilons=self.epsilons,
            )
        cost = time.perf_counter() - start
        plan_info = plan.describe()
        plan_info["notes"] = list(plan.notes)
        plan_info["num_samples"] = n
        return {
            "prediction": result.prediction.to_dict(),
            "extended": {"loss": result.extended_loss, "band": result.extended_band},
            "what_if": result.what_if,
            "plan": plan_info,
            "cost_seconds": cost,
        }

    def _clear_prediction(self) -> None:
        self._prediction = None
        self._converge_cache.clear()
        self._extended = {}
        self._refinement = None
        self._plan = None
        self._what_if_table = []
        self._cost_seconds = None
        self.lr_schedule = None
        self.observed_losses = []

    def _load_payload(self, payload: dict[str, Any]) -> None:
        from ._engine import prediction_from_dict

        self._prediction = prediction_from_dict(payload["prediction"])
        self._converge_cache.clear()
        self._extended = payload.get("extended") or {}
        self._what_if_table = list(payload.get("what_if") or [])
        self._plan = payload["plan"]
        self._cost_seconds = payload.get("cost_seconds")
        self._refinement = None
        self.observed_losses = []

    # ------------------------------------------------------------------ during training
    def _flush(self) -> None:
        if self._pending:
            self.observed_losses.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending = []

    def _refine_now(self) -> None:
        if self._prediction is None:
            return
        try:
            self._flush()
            if len(self.observed_losses) < 2:
                return
            # the simulation continued past the run (to 2T) lets a faster-than-predicted run
            # follow the predicted curve beyond T
            loss = self._extended.get("loss") or self._prediction.loss
            band = self._extended.get("band") if self._extended.get("loss") else self._prediction.loss_band
            self._converge_cache.clear()
            self._refinement = refine_curve(
                np.asarray(loss, dtype=np.float64),
                self.observed_losses,
                band=None if band is None else (np.asarray(band[0]), np.asarray(band[1])),
                horizon=len(self._prediction.loss) - 1,
                start=self._refinement,
            )
        except Exception as exc:  # noqa: BLE001
            self._fail("closed-loop refinement", exc)

    def _log_progress(self, trainer: Any, step: int) -> None:
        if not trainer.loggers:
            return
        metrics: dict[str, float] = {}
        for eps in self.epsilons:
            t = self.converge_step(eps)
            if t is not None:
                metrics[f"ttp/steps_to_converge_eps{eps:g}"] = float(t)
        eta = self.eta(step)
        if eta["eta_converge_seconds"] is not None:
            metrics["ttp/eta_converge_seconds"] = float(eta["eta_converge_seconds"])
            metrics["ttp/eta_end_seconds"] = float(eta["eta_end_seconds"])  # type: ignore[arg-type]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _log_curve(self, trainer: Any) -> None:
        pred = self._prediction
        loss = np.asarray(pred.loss, dtype=np.float64)
        steps = np.asarray(pred.steps)
        band = pred.loss_band
        error = pred.error
        idx = np.arange(loss.size)
        if idx.size > self.max_curve_points:
            idx = np.unique(np.linspace(0, idx.size - 1, self.max_curve_points).round().astype(int))
        for logger in trainer.loggers:
            for i in idx:
                metrics = {"ttp/predicted_loss": float(loss[i])}
                if band is not None:
                    metrics["ttp/predicted_loss_low"] = float(band[0][i])
                    metrics["ttp/predicted_loss_high"] = float(band[1][i])
                if error is not None:
                    metrics["ttp/predicted_error"] = float(error[i])
                logger.log_metrics(metrics, step=int(steps[i]))
            logger.save()

    def _log_what_if(self, trainer: Any) -> None:
        """The what-if table as text on TensorBoard loggers (other loggers: printed only)."""
        rows = ["| setting | " + " | ".join(f"T(ε={e:g})" for e in self.epsilons) + " | final loss |",
                "|---|" + "---|" * (len(self.epsilons) + 1)]
        for row in self._what_if_table:
            cells = " | ".join(_steps_text(row["steps_to_converge"].get(str(e))) for e in self.epsilons)
            rows.append(f"| {row['setting']} | {cells} | {row.get('final_loss', float('nan')):.4g} |")
        for logger in trainer.loggers:
            if type(logger).__name__ == "TensorBoardLogger":
                try:
                    logger.experiment.add_text("ttp/what_if", "\n".join(rows), global_step=trainer.global_step)
                except Exception as exc:  # noqa: BLE001
                    self._warn_once("tb_text", f"lightning_ttp: could not add the what-if table to TensorBoard: {exc}")

    # ------------------------------------------------------------------ reports
    def summary(self) -> str:
        """One paragraph: predicted steps to converge, ETA, cost, warnings."""
        pred = self._prediction
        if pred is None:
            return "lightning_ttp: no prediction."
        plan = self._plan or {}
        loss = np.asarray(pred.loss)
        parts = [
            f"lightning_ttp: predicted fine-tuning of {plan.get('steps', len(loss) - 1)} optimiser steps "
            f"(batch {plan.get('batch_size')} × accumulate {plan.get('accumulate_grad_batches')} × "
            f"{plan.get('world_size')} process(es); kernel on {plan.get('num_samples')} samples):",
            f"loss {loss[0]:.4g} → {loss[-1]:.4g}",
        ]
        if pred.loss_band is not None:
            parts[-1] += f" (band {float(pred.loss_band[0][-1]):.4g}–{float(pred.loss_band[1][-1]):.4g})"
        if pred.error is not None:
            parts.append(f"training error {float(pred.error[0]):.1%} → {float(pred.error[-1]):.1%}")
        conv = ", ".join(f"ε={e:g} at step {_fmt_steps(_training_time(pred, e))}" for e in self.epsilons)
        parts.append(f"converges {conv}")
        if self._cost_seconds is not None:
            parts.append(f"prediction took {self._cost_seconds:.2f} s")
        parts.append("ETA appears in the progress bar / logs after the first steps")
        text = parts[0] + " " + "; ".join(parts[1:]) + "."
        diag = getattr(pred, "diagnostics", None) or {}
        notes = list((self._plan or {}).get("notes", [])) + [str(w) for w in diag.get("warnings", [])]
        if notes:
            text += " Notes: " + " ".join(notes)
        return text

    def what_if_text(self) -> str:
        """The what-if table as text."""
        if not self._what_if_table:
            return ""
        header = "setting".ljust(22) + "".join(f"T(ε={e:g})".rjust(12) for e in self.epsilons) + "  final loss"
        lines = ["lightning_ttp what-if (same kernel, predicted optimiser steps to converge):", header]
        for row in self._what_if_table:
            cells = "".join(
                _steps_text(row["steps_to_converge"].get(str(e))).rjust(12)
                for e in self.epsilons
            )
            lines.append(f"{row['setting']:<22}{cells}  {row.get('final_loss', float('nan')):.4g}")
        return "\n".join(lines)

    def real_training_time(self, eps: float) -> int | None:
        """ε-training-time of the observed (smoothed) loss curve; None when the run did not
        reach its planned number of steps (the final value L_T is then unknown)."""
        if not self._run_complete():
            return None
        return epsilon_training_time(self._real_curve(), eps)

    def _run_complete(self) -> bool:
        self._flush()
        steps = self.planned_steps
        return bool(self.observed_losses) and steps is not None and len(self.observed_losses) >= steps

    def _real_curve(self) -> np.ndarray:
        plan = self._plan or {}
        size = plan.get("dataset_size")
        full_batch = size is not None and plan.get("effective_batch_size", 0) >= size
        window = default_smoothing_window(plan.get("steps_per_epoch"), full_batch)
        return smooth_losses(self.observed_losses, window)

    def final_summary(self) -> str:
        """Predicted vs. real ε-training-time at the end of the fit."""
        pred = self._prediction
        if pred is None:
            return "lightning_ttp: no prediction."
        lines = ["lightning_ttp: predicted vs. real training time (optimiser steps):"]
        for eps in self.epsilons:
            predicted = _training_time(pred, eps)
            row = f"  ε={eps:g}: predicted {_fmt_steps(predicted)}"
            if self._refinement is not None:
                row += f", refined {_fmt_steps(_training_time(self._refinement, eps))}"
            if not self._run_complete():
                row += ", real n/a (the run stopped before its planned steps)"
            else:
                real = self.real_training_time(eps)
                row += f", real {_fmt_steps(real)}"
                if real is not None and predicted is not None:
                    row += f" (open-loop error {abs(predicted - real) / max(real, 1):.0%})"
            lines.append(row)
        sps = self.seconds_per_step()
        if sps is not None and self._fit_start_time is not None:
            took = format_duration(time.perf_counter() - self._fit_start_time)
            lines.append(f"  measured {sps * 1000:.1f} ms/step; fit took {took}")
        return "\n".join(lines)

    def _save_plot(self, trainer: Any) -> str | None:
        from ..report.plots import matplotlib_available, plot_prediction, save_figure

        if not matplotlib_available():
            self._warn_once("plot", "lightning_ttp: matplotlib is not installed; no plot (pip install matplotlib).")
            return None
        pred = self._prediction
        self._flush()
        real = np.asarray(self.observed_losses) if self.observed_losses else None
        times: dict[str, float | int | None] = {}
        eps = self.epsilons[0]
        times[f"predicted T(ε={eps:g})"] = _training_time(pred, eps)
        real_t = self.real_training_time(eps) if real is not None else None
        if real_t is not None:
            times[f"real T(ε={eps:g})"] = real_t
        fig = plot_prediction(
            np.asarray(pred.steps),
            np.asarray(pred.loss),
            band=pred.loss_band,
            real=real,
            real_smoothed=self._real_curve() if real is not None else None,
            refined=None if self._refinement is None else self._refinement.loss,
            training_times=times,
        )
        directory = trainer.log_dir or trainer.default_root_dir
        path = save_figure(fig, os.path.join(directory, "ttp_prediction.png"))
        for logger in trainer.loggers:
            if type(logger).__name__ == "TensorBoardLogger":
                try:
                    logger.experiment.add_figure("ttp/predicted_vs_real", fig, global_step=trainer.global_step)
                except Exception as exc:  # noqa: BLE001
                    self._warn_once("tb", f"lightning_ttp: could not add the plot to TensorBoard: {exc}")
        self.plot_path = path
        if self.verbose:
            rank_zero_info(f"lightning_ttp: plot saved to {path}")
        return path


def _steps_text(steps: int | None) -> str:
    """A what-if cell: the predicted steps, or "never" for a curve that does not converge."""
    return "never" if steps is None else str(steps)


def _xy_part(batch: Any, index: int, what: str, fix: str) -> Any:
    """``batch[index]`` of an (x, y) batch; otherwise a TypeError that says which callables to pass."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[index]
    raise TypeError(
        f"TrainingTimePredictor cannot find the {what} in a batch of type {type(batch).__name__}: the default "
        f"expects (x, y) batches with logits = pl_module(x). Pass TrainingTimePredictor({fix})."
    )
