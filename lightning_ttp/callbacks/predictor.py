"""``TrainingTimePredictor``: predict how long the fine-tuning will take, before it starts.

A thin caller of the public pipeline (:mod:`lightning_ttp.api`): at ``on_fit_start`` it
builds the run's plan from the Trainer (:func:`._trainer_state.plan_from_trainer`), draws the
kernel subset (:func:`lightning_ttp.pipeline.data.sample_subset`) and calls
:func:`lightning_ttp.api.predict_run` and :func:`lightning_ttp.pipeline.simulate.what_if` — the same
functions :func:`lightning_ttp.predict_training_time` calls, so the same run gives the same
prediction either way. During training it refines the prediction from the real losses
(:mod:`lightning_ttp.pipeline.refine`) and keeps an ETA (:mod:`.eta`); what it keeps across a checkpoint
and computes on it between hooks is :mod:`lightning_ttp.pipeline.run_state`; reports live in :mod:`._report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

from ..dynamics import get_loss
from ..pipeline import run_state
from ..pipeline.closed_loop import ClosedLoop
from ..pipeline.data import sample_subset
from ..pipeline.predict import DEFAULT_BUDGET, predict_run
from ..pipeline.prediction import Prediction
from ..pipeline.refine import Refinement, default_smoothing_window, epsilon_training_time, smooth_losses
from ..pipeline.run_state import PredictorState
from ..pipeline.simulate import Method, check_what_if, what_if
from . import _report
from ._compat import bases
from ._trainer_state import (
    kernel_sharding,
    plan_from_trainer,
    preserve_state,
    same_on_every_rank,
    train_dataloader,
    unsupported_strategy,
)
from .eta import StepTimer, format_duration

__all__ = ["PredictorState", "TrainingTimePredictor", "format_duration"]

OutputFn = Callable[[Any, Any], torch.Tensor]
TargetFn = Callable[[Any], torch.Tensor]

def _epsilons(epsilons: float | Sequence[float]) -> tuple[float, ...]:
    values = (epsilons,) if isinstance(epsilons, (int, float)) and not isinstance(epsilons, bool) else epsilons
    try:
        eps = () if isinstance(values, str) else tuple(float(e) for e in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        eps = ()
    if not eps or any(not 0.0 < e < 1.0 for e in eps):
        raise ValueError(f"epsilons must be a value or a sequence of values in (0, 1), e.g. (0.1, 0.01); "
                         f"got {epsilons!r}.")
    return eps


def _positive_int(name: str, value: Any, minimum: int, none_means: str | None = None) -> None:
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        prefix = f"None ({none_means}) or " if none_means else ""
        raise ValueError(f"{name} must be {prefix}an int >= {minimum}, got {value!r}.")


class TrainingTimePredictor(*bases("Callback")):  # type: ignore[misc]
    """Predict the fine-tuning loss curve and time to converge at fit start; ETA while training.

    At ``on_fit_start`` the callback reads the Trainer's plan — the first optimiser and its
    param groups, the lr schedulers as Lightning will step them (``interval``, ``frequency``),
    ``accumulate_grad_batches``, the number of processes and
    ``trainer.estimated_stepping_batches`` — draws a fixed seeded subset of the training data
    (from the DataLoader Lightning is about to use, without iterating it), computes the
    empirical NTK on it once and simulates the linearised training (the paper's eq. 1 in
    discrete time). The model's weights and train/eval modes, ``requires_grad`` flags,
    ``.grad`` buffers, the optimiser state and the torch/numpy/python RNG streams are left
    exactly as they were.

    Logged (rank zero, to every ``trainer.loggers``): the predicted curve at fit start
    (``ttp/predicted_loss``, ``ttp/predicted_loss_low``/``_high``, ``ttp/predicted_error``);
    during training every ``log_every_n_steps`` steps ``ttp/steps_to_converge_eps{ε}``
    (refined) and ``ttp/eta_converge_seconds`` / ``ttp/eta_end_seconds``. A summary is printed
    at fit start and at fit end (predicted vs. real ε-training-time), plus a PNG plot.

    Args:
        loss: the training loss the LightningModule uses: ``"cross_entropy"``, ``"mse"``,
            ``"bce_with_logits"``, a ``torch.nn`` loss or a callable ``loss(outputs, targets)``
            (mean over the batch).
        epsilons: relative tolerances ε for the ε-training-time (the first one is the headline
            "converges ≈ step ..."), each in (0, 1).
        num_samples: training samples in the kernel subset (cost grows ~quadratically).
        steps: planned optimiser steps; default ``trainer.estimated_stepping_batches``
            (required for an ``IterableDataset`` without ``max_steps``).
        projection_dim, method, num_paths, seed: passed to the prediction pipeline
            (:func:`lightning_ttp.api.predict_run`); ``num_paths`` also sets the Monte Carlo
            mini-batch paths of the closed loop's continuation.
        output_fn: ``output_fn(pl_module, batch) -> (N, C) logits`` when the logits are not
            ``pl_module(batch[0])`` (tuples, dicts and ``ModelOutput.logits`` are found without it).
        target_fn: ``target_fn(batch) -> targets`` when the batch is not ``(x, y, ...)``.
        what_if: alternative settings to predict with the same kernel, e.g.
            ``{"lr": [0.01, 0.1], "batch_size": [16, 64], "momentum": [0.0, 0.9]}``
            (one key varied at a time); table printed at fit start, see :attr:`what_if_table`.
        refine: refine the prediction while training (closed loop): re-linearise the model at
            2, 5, 10, 20 and 40 % of the run (:class:`lightning_ttp.pipeline.closed_loop.ClosedLoop`:
            the kernel re-estimated on the same subset at the current weights, the optimiser's
            state carried into function space, the rest of the run re-simulated from the
            current outputs) within ``relinearise_budget``, and refit the latest curve to the
            observed losses (:func:`lightning_ttp.pipeline.refine.refine_curve`) at 2, 5, 10, 25 and
            50 % of the run and then every ``refine_every`` steps within ``refine_budget``.
        refine_every: after the fixed early refits, refit every this many optimiser steps
            (default: ~2 % of the run).
        refine_budget: maximal share of the wall clock spent on the periodic refits.
        relinearise_budget: share of the run's cost the closed loop may spend re-linearising on
            top of the fit-start prediction's own cost, both counted in multiply-adds at fit
            start (:func:`lightning_ttp.pipeline.run_state.relinearisation_steps`: never timed, so
            the same calls are made on any machine at any load; a call that would exceed it is
            skipped, the refits go on). The first call, early in the run, counts no more than
            the fit-start prediction and is made on runs of any length. With ``projection_dim``
            (a kernel the counts do not cover) only the first call is made.
        budget: shrink the kernel (a smaller subset or the trace kernel) only when the exact
            kernel on ``num_samples`` would count more multiply-adds than this multiple of the
            run (default 1; :mod:`lightning_ttp.pipeline.budget`: counted from the model's shapes, never
            timed, so the prediction does not depend on the machine's load); ``None``: always
            the exact kernel on ``num_samples``.
        warmup_steps: optimiser steps ignored when measuring seconds per step.
        log_curve: write the predicted curve to the loggers at fit start.
        max_curve_points: at most this many points of the predicted curve are logged.
        plot: save ``ttp_prediction.png`` in the logger directory at fit end (needs matplotlib).
        verbose: print the summaries (rank zero).
        strict: raise instead of warning when the prediction fails.
        shard_kernel: under a data-parallel strategy (``ddp``, ``ddp_spawn``, ``ddp_fork``, their
            ``find_unused_parameters`` variants) with several processes, split the kernel subset
            across them at fit start and in the closed loop (:class:`lightning_ttp.kernel.Sharding`:
            each process runs the passes of its shard, the Gram is assembled with the strategy's
            ``all_gather``; every process gets the same prediction, rank zero's); the look-ahead
            runs on every process alike. ``False``: rank zero computes the whole kernel and the
            others wait for its prediction (no closed loop on them).
    """

    def __init__(
        self,
        *,
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
        epsilons: float | Sequence[float] = (0.1, 0.01),
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
        relinearise_budget: float = 0.02,
        budget: float | None = DEFAULT_BUDGET,
        warmup_steps: int = 3,
        log_curve: bool = True,
        max_curve_points: int = 5000,
        plot: bool = True,
        verbose: bool = True,
        strict: bool = False,
        shard_kernel: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(loss, str) or callable(loss)):
            raise TypeError(f"loss must be a name like 'cross_entropy' or a callable, got {type(loss).__name__}.")
        get_loss(loss)  # an unknown name fails here, with the accepted names
        self.epsilons = _epsilons(epsilons)
        _positive_int("num_samples", num_samples, 2)
        _positive_int("steps", steps, 1, "use the Trainer's plan")
        _positive_int("projection_dim", projection_dim, 1, "exact kernel")
        _positive_int("num_paths", num_paths, 1)
        _positive_int("refine_every", refine_every, 1, "about 2 % of the run")
        _positive_int("warmup_steps", warmup_steps, 0)
        _positive_int("max_curve_points", max_curve_points, 2)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        self.method = Method.parse(method).value
        for name, fn in (("output_fn", output_fn), ("target_fn", target_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}.")
        shares = (("refine_budget", refine_budget, 1.0), ("relinearise_budget", relinearise_budget, 1e6))
        for name, share, top in shares:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= top:
                raise ValueError(f"{name} must be a share of the run in [0, {top:g}], got {share!r}.")
        if refine_budget == 0:
            raise ValueError("refine_budget must be > 0 (pass refine=False to turn the closed loop off).")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget <= 1000):
            raise ValueError(f"budget must be None or a multiple of the run's cost in (0, 1000], e.g. 1.0; "
                             f"got {budget!r}.")
        self.budget = budget
        self._what_if = check_what_if(what_if)
        self.loss = loss
        self.num_samples = num_samples
        self.steps = steps
        self.projection_dim = projection_dim
        self.num_paths = num_paths
        self.seed = seed
        self.output_fn = output_fn
        self.target_fn = target_fn
        self.refine = refine
        self.refine_every = refine_every
        self.refine_budget = float(refine_budget)
        self.relinearise_budget = float(relinearise_budget)
        self.warmup_steps = warmup_steps
        self.log_curve = log_curve
        self.max_curve_points = max_curve_points
        self.plot = plot
        self.verbose = verbose
        self.strict = strict
        self.shard_kernel = bool(shard_kernel)

        self.state = PredictorState()
        #: (steps, param groups) learning rates the prediction assumed (set at fit start)
        self.lr_schedule: np.ndarray | None = None
        self.plot_path: str | None = None
        self._restored = False  # set by load_state_dict: the next fit keeps the restored prediction
        self._disabled_reason: str | None = None
        self._warned: set[str] = set()
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Per-fit bookkeeping that is not saved: pending losses, timers, caches."""
        self._pending: list[torch.Tensor] = []
        self._micro: list[torch.Tensor] = []
        self._last_global_step: int | None = None
        self._timer = StepTimer(warmup=self.warmup_steps)
        self._refits_due: list[int] = []
        self._last_refined_at = -1
        self._next_refine_time = 0.0
        self._status_cache: tuple[Any, int, float, str | None] = (None, -1, 0.0, None)
        self._converge_cache: dict[float, int | None] = {}
        self._fit_start_time: float | None = None
        self._loop: ClosedLoop | None = None  # this fit only, holds the fit-start kernel: rank zero, or every rank
        self._relinearise_at: set[int] = set()  # the loop's steps that fit its counted budget
        self._sharding: Any = None  # the kernel's Sharding across the ranks (None: not split)
        self._loop_dead = False  # sharded: this rank stopped its loop; all ranks stop at the next loop step

    # ------------------------------------------------------------------ public API
    @property
    def prediction(self) -> Prediction | None:
        """The open-loop :class:`~lightning_ttp.Prediction` (None before fit start or if it failed)."""
        return self.state.prediction

    @property
    def refinement(self) -> Refinement | None:
        """The closed-loop refinement from the observed losses (None until enough losses)."""
        return self.state.refinement

    @property
    def what_if_table(self) -> list[dict[str, Any]]:
        """Rows ``{"setting": "lr=0.1", "steps_to_converge": {ε: steps}}`` of the what-if study."""
        return list(self.state.what_if)

    @property
    def plan(self) -> dict[str, Any] | None:
        """What the Trainer was about to do when the prediction was made."""
        return None if self.state.plan is None else dict(self.state.plan)

    @property
    def planned_steps(self) -> int | None:
        """The run's planned length in ``trainer.global_step`` units."""
        return None if self.state.plan is None else int(self.state.plan["steps"]) * self.step_unit

    @property
    def step_unit(self) -> int:
        """``global_step`` per predicted optimiser step (> 1 under manual optimisation with
        several optimisers); predicted steps are multiplied by it for the bar and the loggers."""
        return int((self.state.plan or {}).get("global_steps_per_step", 1))

    @property
    def cost_seconds(self) -> float | None:
        """Wall-clock seconds the fit-start prediction took (the what-if table not included)."""
        return self.state.cost_seconds

    @property
    def what_if_seconds(self) -> float:
        """Wall-clock seconds the what-if table's simulations took."""
        return self.state.what_if_seconds

    @property
    def observed_losses(self) -> list[float]:
        """The real training loss of every optimiser step so far."""
        self._flush()
        return self.state.observed_losses

    @property
    def state_key(self) -> str:
        return self._generate_state_key(epsilons=self.epsilons, seed=self.seed, num_samples=self.num_samples)

    def converge_step(self, eps: float | None = None) -> int | None:
        """Predicted ε-training-time (refined when available) in optimiser steps."""
        eps = self.epsilons[0] if eps is None else eps
        if self.state.prediction is None:
            return None
        if eps not in self._converge_cache:  # O(T): once per prediction/refinement, not per step
            self._converge_cache[eps] = run_state.converge_step(self.current_curve(), eps, self.step_unit)
        return self._converge_cache[eps]

    def current_curve(self) -> np.ndarray:
        """The best current estimate of the run's loss curve (steps 0..T): the refit of the
        latest re-linearised curve (or of the open-loop prediction) to the observed losses."""
        return self.state.current_curve()

    def seconds_per_step(self) -> float | None:
        """Median seconds per optimiser step after the warm-up steps (None before)."""
        return self._timer.seconds_per_step()

    def fit_seconds(self) -> float | None:
        """Seconds since the fit started (None outside a fit)."""
        return None if self._fit_start_time is None else time.perf_counter() - self._fit_start_time

    def eta(self, global_step: int) -> dict[str, float | int | None]:
        """Steps and seconds remaining to convergence (headline ε) and to the end of the run."""
        return run_state.eta(self.converge_step(), global_step, self.planned_steps, self.seconds_per_step())

    def status_text(self, global_step: int) -> str | None:
        """``"converges ≈ step 412 · ETA 3:12 · run ends 9:40"`` (None without a prediction).

        Recomputed at most 4 times a second between refinements (the text is for humans).
        """
        if self.state.prediction is None:
            return None
        key = (id(self.state.refinement), self.state.live_step, self.seconds_per_step())
        now = time.perf_counter()
        cached_key, cached_step, cached_time, cached_text = self._status_cache
        if cached_key == key and (cached_step == global_step or now - cached_time < 0.25):
            return cached_text
        eta = self.eta(global_step)
        text = None
        if eta["converge_step"] is not None:
            parts = [f"converges ≈ step {eta['converge_step']}"]
            if eta["seconds_per_step"] is not None:
                parts.append(f"ETA {format_duration(eta['eta_converge_seconds'])}")
                parts.append(f"run ends {format_duration(eta['eta_end_seconds'])}")
            text = " · ".join(parts)
        self._status_cache = (key, global_step, now, text)
        return text

    def summary(self) -> str:
        """One paragraph: predicted steps to converge, cost, notes."""
        return _report.summary(self)

    def what_if_text(self) -> str:
        """The what-if table as text."""
        return _report.what_if_text(self)

    def final_summary(self) -> str:
        """Predicted vs. real ε-training-time at the end of the fit."""
        return _report.final_summary(self)

    def real_training_time(self, eps: float) -> int | None:
        """ε-training-time of the observed (smoothed) loss curve; None when the run did not
        reach its planned number of steps (the final value L_T is then unknown)."""
        if not self.run_complete():
            return None
        return epsilon_training_time(self.real_curve(), eps)

    def run_complete(self) -> bool:
        """Whether a loss was observed for every planned optimiser step."""
        steps = None if self.state.plan is None else int(self.state.plan["steps"])
        return steps is not None and len(self.observed_losses) >= steps > 0

    def real_curve(self) -> np.ndarray:
        """The observed losses smoothed the package's one way (:func:`lightning_ttp.pipeline.refine.smooth_losses`,
        window = steps per epoch, 1 for full-batch runs)."""
        plan = self.state.plan or {}
        window = default_smoothing_window(plan.get("steps_per_epoch"), bool(plan.get("full_batch")))
        return smooth_losses(self.observed_losses, window)

    # ------------------------------------------------------------------ failure policy
    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    def _fail(self, where: str, error: BaseException) -> None:
        if self.strict:
            raise error
        self.warn_once(
            where,
            f"lightning_ttp: {where} failed ({type(error).__name__}: {error}). Training continues without it; "
            "pass TrainingTimePredictor(strict=True) to make this an error.",
        )

    # ------------------------------------------------------------------ fit start
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._disabled_reason = None  # a reused callback: decided again for this Trainer
        reason = unsupported_strategy(trainer)
        if reason is not None:
            if self.strict:
                raise RuntimeError(f"TrainingTimePredictor cannot run: {reason}")
            self._disabled_reason = reason
            self.warn_once("strategy", f"lightning_ttp: TrainingTimePredictor is disabled: {reason}")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()
        self._fit_start_time = time.perf_counter()
        restored, self._restored = self._restored, False
        if self._disabled_reason is not None:
            return
        if restored and self.state.prediction is not None:
            # resumed from a checkpoint: the weights are no longer the pre-trained ones, so
            # the prediction is kept, not recomputed
            if self.verbose:
                rank_zero_info("lightning_ttp: prediction restored from the checkpoint (not recomputed).")
            self._schedule_refits()
            return
        self.state = PredictorState()  # a new fit: nothing of a previous one is kept
        self.lr_schedule = None
        payload: dict[str, Any] | None = None
        error: BaseException | None = None
        try:  # every rank loads its DataLoader (Lightning may synchronise there) and plans
            loader = train_dataloader(trainer)
            plan = plan_from_trainer(trainer, loader, self.steps)
            self.lr_schedule = plan.lr_schedule
        except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
            loader, plan, error = None, None, exc
        self._sharding = kernel_sharding(trainer) if self.shard_kernel else None
        if self._sharding is not None and not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            # a rank could not plan: none of them may enter the sharded kernel's collectives
            error = error or RuntimeError("another process could not plan the run")
        if error is None and (trainer.is_global_zero or self._sharding is not None):
            try:  # sharded: every rank computes its shard of the kernel (collectives); else rank zero alone
                payload = self._predict(trainer, pl_module, loader, plan)
            except Exception as exc:  # noqa: BLE001
                error = exc
                payload = {"error": f"{type(exc).__name__}: {exc}"}
        if trainer.world_size > 1:  # every rank gets rank zero's prediction (or failure)
            payload = trainer.strategy.broadcast(payload, src=0)
        if self._sharding is not None:  # the closed loop's calls are collectives: on every rank, or on none
            if not trainer.strategy.reduce_boolean_decision(self._loop is not None, all=True):
                self._loop = None
            if payload is not None and "error" not in payload:
                error = None  # rank zero's prediction stands; a rank's own failure after the collectives is moot
        if error is not None:
            self._fail("training-time prediction", error)
            return
        if payload is None or "error" in payload:
            message = "unknown error" if payload is None else payload["error"]
            self._fail("training-time prediction (on rank zero)", RuntimeError(message))
            return
        self.state = PredictorState.from_dict(payload)
        self._schedule_refits()
        if trainer.is_global_zero:
            self._report_fit_start(trainer)

    def _predict(self, trainer: Any, pl_module: Any, loader: Any, plan: Any) -> dict[str, Any]:
        """The prediction as a plain dict (rank zero's is broadcast to the other ranks): on rank
        zero, or with a sharded kernel on every rank in step."""
        from lightning_fabric.utilities.apply_func import move_data_to_device

        start = time.perf_counter()
        sharding = self._sharding
        with preserve_state(pl_module):
            subset, n = sample_subset(loader, self.num_samples, self.seed)
            if sharding is not None:  # every rank's shard must come from the same subset
                subset, sent = same_on_every_rank(trainer.strategy, subset)
                if sent:
                    self.warn_once("subset", "lightning_ttp: the ranks drew different kernel subsets (an "
                                   "IterableDataset split by rank?); rank zero's subset was sent to every rank.")
                    n = int(trainer.strategy.broadcast(n, src=0))
            # the dtype and device Lightning gives training batches (e.g. precision="64-true", "bf16-true")
            subset = trainer.precision_plugin.convert_input(move_data_to_device(subset, pl_module.device))
            run = predict_run(
                pl_module, subset, trainer.optimizers[0], plan, loss=self.loss, output_fn=self.output_fn,
                target_fn=self.target_fn, projection_dim=self.projection_dim, method=self.method,
                num_paths=self.num_paths, seed=self.seed, budget=self.budget, sharding=sharding)
            predicted = time.perf_counter()
            rows = what_if(run.kernel, run.spec, plan, self._what_if, self.epsilons, method=self.method,
                           num_paths=self.num_paths, seed=self.seed) if self._what_if and trainer.is_global_zero else []
            what_if_seconds = time.perf_counter() - predicted
        if self.refine:
            self._loop = ClosedLoop(
                run.spec, run.inputs, run.targets, plan.steps, run.kernel, lr_schedule=plan.lr_schedule,
                loss=self.loss, batch_size=plan.effective_batch_size, dataset_size=plan.dataset_size,
                smoothing_window=default_smoothing_window(plan.steps_per_epoch, plan.full_batch),
                reference=run.prediction.loss, output_fn=run.output_fn, projection_dim=self.projection_dim,
                num_paths=self.num_paths, seed=self.seed, sharding=sharding)
            self._relinearise_at = set(run_state.relinearisation_steps(
                self._loop.steps, run.prediction.diagnostics.extra.get("budget"), plan.steps, self.relinearise_budget))
        plan_info = plan.describe()
        plan_info["num_samples"] = n
        state = PredictorState(run.prediction, None, plan_info, rows, predicted - start,
                               what_if_seconds=what_if_seconds)
        return state.to_dict()

    def _schedule_refits(self) -> None:
        # global_step units, like the step the hook sees
        self._refits_due = run_state.refit_steps(self.planned_steps or 0)

    def _report_fit_start(self, trainer: Any) -> None:
        """Log and print the prediction (rank zero); a failure here never stops training."""
        for enabled, where, report in (
            (self.log_curve, "logging to the loggers", _report.log_curve),
            (bool(self.state.what_if), "logging the what-if table", _report.log_what_if),
        ):
            if enabled:
                try:
                    report(self, trainer)
                except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
                    self._fail(where, exc)
        if self.verbose:
            try:
                rank_zero_info(self.summary())
                if self.state.what_if:
                    rank_zero_info(self.what_if_text())
            except Exception as exc:  # noqa: BLE001
                self._fail("the fit-start summary", exc)

    # ------------------------------------------------------------------ during training
    def _flush(self) -> None:
        if self._pending:
            self.state.observed_losses.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending = []

    def _real_run_diverged(self, observed: Sequence[float]) -> bool:
        """Whether the real loss turned non-finite; then the closed loop stops, saying so once (the
        run itself diverged: nothing of it can be refined or re-linearised)."""
        if not run_state.real_run_diverged(observed):
            return False
        self._drop_loop()
        if "real_diverged" not in self._warned:
            self._warned.add("real_diverged")
            if self.verbose:
                rank_zero_info(f"lightning_ttp: the training loss is non-finite at step {len(observed)}; the "
                               "prediction is no longer refined.")
        return True

    def _refine_now(self, fresh: bool = False) -> None:
        pred = self.state.prediction
        if pred is None:
            return
        if pred.diverged and self.state.live_loss is None:
            return  # the fit-start note says the simulated run diverges: there is no curve to refit
        try:
            observed = self.observed_losses
            if len(observed) < 2 or self._real_run_diverged(observed):
                return
            self._converge_cache.clear()
            self.state.refinement = self.state.refit(observed, fresh=fresh)
        except Exception as exc:  # noqa: BLE001
            self._fail("closed-loop refinement", exc)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # optimiser steps are counted from here: global_step changes after each one
        self._last_global_step = trainer.global_step
        now = time.perf_counter()
        self._timer.start(now)
        # a refit costs ~10-30 ms: the periodic ones wait until that is within the time budget
        self._next_refine_time = now + 0.02 / self.refine_budget

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.state.prediction is None:
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
        self._timer.step(now)
        if self.refine:
            if self._loop is not None:
                self._maybe_relinearise(trainer, pl_module, step)
            self._maybe_refine(step, now)
        if trainer.is_global_zero and step % max(1, trainer.log_every_n_steps) == 0:
            try:
                self._log_progress(trainer, step)
            except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
                self._fail("logging to the loggers", exc)

    def _maybe_refine(self, step: int, now: float) -> None:
        """Refit at the fixed early fractions of the run (live from its first percent, however
        short), then every ``refine_every`` steps within the time budget. The fixed refits start
        afresh, so what they give does not depend on the periodic ones the clock let through
        before them (a warm start converges to the same fit only to ~1e-8, which can move a
        converge step by one)."""
        fresh = bool(self._refits_due) and step >= self._refits_due[0]
        if fresh:
            while self._refits_due and step >= self._refits_due[0]:
                self._refits_due.pop(0)
        else:
            every = self.refine_every or max(1, (self.planned_steps or 500) // 50)
            if step - self._last_refined_at < every or now < self._next_refine_time:
                return
        self._last_refined_at = step
        self._refine_now(fresh)
        self._next_refine_time = now + (time.perf_counter() - now) / self.refine_budget

    def _drop_loop(self) -> None:
        """Stop the closed loop: at once on one process; sharded, at the next loop step on every
        rank together (its calls are collectives)."""
        if self._sharding is None:
            self._loop = None
        else:
            self._loop_dead = True

    def _maybe_relinearise(self, trainer: Any, pl_module: Any, step: int) -> None:
        """Re-linearise at the loop's steps (2, 5, 10, 20, 40 % of the run) that fit its counted
        budget (chosen at fit start: the loop's total count stays within ``relinearise_budget``
        of the run's plus the fit-start prediction's), so the first call happens on runs of any
        length, and the later ones as the run's length affords them."""
        loop, k = self._loop, step // self.step_unit
        assert loop is not None
        if k not in loop.steps:
            return
        observed = self.observed_losses
        go = self._relinearise_now(k, observed)
        if self._sharding is not None:  # rank zero sends its losses: one call on every rank, on the same input
            strategy = trainer.strategy
            if not strategy.reduce_boolean_decision(not self._loop_dead, all=True):
                self._loop = None  # a rank stopped its loop: every rank stops
                return
            go, observed = strategy.broadcast((go, observed), src=0)
        if not go:
            return
        error = None
        try:
            with preserve_state(pl_module):
                live = loop.update(pl_module, trainer.optimizers[0], observed)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
            error = exc
        if self._sharding is not None and not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            error = error or RuntimeError("re-linearising failed on another process")
        if error is not None:
            self._loop = None
            if not self._real_run_diverged(observed):
                self._fail("re-linearising the model", error)
            return
        self.state.live_seconds += live.seconds
        self.state.live_loss, self.state.live_step = live.loss.tolist(), k
        self.state.refinement = None  # the next refit starts from the new curve
        self._converge_cache.clear()
        if trainer.is_global_zero and trainer.loggers:
            metrics = {"ttp/kernel_scale": float(live.drift.scale), "ttp/kernel_alignment": float(live.drift.alignment),
                       "ttp/kernel_growth": float(live.drift.growth)}
            try:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
            except Exception as exc:  # noqa: BLE001 - failure policy: warn and continue
                self._fail("logging to the loggers", exc)

    def _relinearise_now(self, k: int, observed: list[float]) -> bool:
        """Whether the closed loop calls at step k: one of the steps its counted budget allows, with
        every loss up to k observed (not on a resumed or partly observed run: the refits go on alone)."""
        return len(observed) == k and k in self._relinearise_at

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

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.state.prediction is None:
            return
        try:
            if self.refine:
                self._refine_now(fresh=True)
            # trainer.log_dir broadcasts under DDP: every rank must read it, not only rank zero
            directory = (trainer.log_dir or trainer.default_root_dir) if self.plot else None
            if trainer.is_global_zero:
                if self.verbose:
                    rank_zero_info(self.final_summary())
                if directory is not None:
                    self.plot_path = _report.save_plot(self, trainer, directory)
        except Exception as exc:  # noqa: BLE001
            self._fail("the end-of-fit report", exc)
        if trainer.world_size > 1:  # the other ranks wait for rank zero's report before tearing down
            trainer.strategy.barrier("lightning_ttp.predictor.fit_end")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return self.state.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = PredictorState.from_dict(state_dict)
        self._converge_cache.clear()
        self._restored = True
