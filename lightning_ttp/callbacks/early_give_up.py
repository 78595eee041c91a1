"""``EarlyGiveUp``: stop runs that the DAI compression scores predict will not train.

The callback is thin, like Lightning's ``EarlyStopping``: an
:class:`~lightning_ttp.spectral.ActivationRecorder` (pure torch) records the hidden
representations of a fixed sample set during Lightning's own validation loop; the rows of
all ranks are gathered (so the scores do not depend on the number of processes); the
spectra and scores of eq. (2)–(8) of Jain & Ramaswamy come from :mod:`lightning_ttp.spectral`;
:func:`lightning_ttp.spectral.decide` decides; the callback reduces the decision across
ranks and acts. What it keeps across a checkpoint and computes on it between hooks (the window of
spectra, the history entries and metrics, the round's decision) is
:mod:`lightning_ttp.pipeline.give_up_state`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils._pytree import tree_map

from ..pipeline import give_up_state
from ..pipeline.data import logits_of, num_samples_in, sample_subset, split_batch
from ..pipeline.give_up_state import GiveUpState
from ..spectral import ActivationRecorder, GiveUpDecision, Scores, SpectralConfig, compute_scores, layer_spectra
from ._compat import bases, installed_namespaces
from ._trainer_state import preserve_state

__all__ = ["EarlyGiveUp"]

GiveUpHook = Callable[[Any, Any, GiveUpDecision], None]


def _is_fitting(trainer: Any) -> bool:
    return trainer.state.fn == "fit" and not trainer.sanity_checking


class EarlyGiveUp(*bases("Callback")):  # type: ignore[misc]
    r"""Give up early on a run whose hidden representation does not compress (DAI paper, Sec. III–VI).

    Per validation round t (t = ``trainer.current_epoch + 1``, completed training epochs):

    * σ_{tl} = normalised singular values (and the RMS scale) of the (m × d_l) representation
      of each monitored layer l on a fixed set of m samples (the first ``num_samples``
      validation samples, gathered across ranks);
    * s_ot (eq. 2–3), s_st (eq. 4–5), s_t = |log s_ot| + η s_st (eq. 6), s_F (eq. 7) and, with a
      validation accuracy v_t, the predicted final accuracy s_Fv (eq. 8), plus the scale drift —
      logged as ``give_up/s_o`` … ``give_up/s_Fv``, ``give_up/v_t``, ``give_up/drift``.

    A round whose activations are non-finite stops the run at once ("diverged"). At the
    checkpoint round the rule of :func:`lightning_ttp.spectral.decide` decides; a round without
    enough history ("insufficient") defers the decision to the next round.

    Args:
        checkpoint_epoch: decide at the first validation round with t >= checkpoint_epoch
            (paper: 10). Any ``check_val_every_n_epoch`` works. Lightning's ``min_epochs`` is
            respected (a stop requested earlier takes effect once they are done).
        t1: give-up threshold on s_F. ``None``: ``config.t1``.
        target_accuracy: optional threshold on s_Fv (the predicted final accuracy, in [0, 1]).
        mode: ``"stop"`` sets ``trainer.should_stop`` (any rank giving up stops all ranks, like
            Lightning's ``EarlyStopping``); ``"warn"`` only logs and prints.
        layers: module names (as in ``named_modules()``) whose outputs to monitor. ``None``: found
            on the first validation batch (see :class:`~lightning_ttp.spectral.ActivationRecorder`:
            the input of the final Linear, post-activation hidden Linears, pooled conv stages).
        conv_stages: how many of the last spatial sizes of a CNN to monitor (pooled).
        num_samples: m, the number of validation samples whose representation is recorded
            (in total over all ranks). The validation data must come in the same order every
            round (Lightning does not shuffle it by default). Without a validation loop: a
            fixed, seeded subset of min(m, N) distinct training samples, run through the model
            in eval mode after each training epoch.
        accuracy_metric: name of a logged metric that holds the validation accuracy in [0, 1]
            (e.g. ``"val_acc"``). ``None``: the callback measures it with a torchmetrics
            accuracy (synced across ranks) from the LightningModule's outputs (logits) and the
            targets of the batch (``lightning_ttp.pipeline.data.split_batch``); otherwise s_Fv is omitted.
        config: :class:`~lightning_ttp.spectral.SpectralConfig` (t0, β, η, t2, δ, γ, drift_tol, ...).
        keep_above: never give up on a stuck run whose v_t is at least this (kind
            ``converged``). ``"auto"``: halfway between chance (1 / classes, the classes read off
            the logits when the callback measures v_t itself; off with ``accuracy_metric``) and 1.
            ``None``: off.
        trial: an ``optuna.trial.Trial``: every round s_Fv (s_F without v_t) is reported where defined,
            and on give-up (``mode="stop"``) ``optuna.TrialPruned`` is raised.
        on_give_up: called as ``on_give_up(trainer, pl_module, decision)`` when the rule fires
            (in both modes). Subclasses can override :meth:`on_give_up` instead.
        output_fn, target_fn: how to call the model on a batch and where its targets are, as in
            :func:`lightning_ttp.pipeline.data.split_batch` (only needed for batches that are not
            ``(x, y, ...)`` or ``{"x", "y"}``).
        plot: save ``give_up_scores.png`` (scores per round, t1, checkpoint, decision) in the
            log directory at the decision and at the end of the fit, and log it to TensorBoard
            when a ``TensorBoardLogger`` is used (needs matplotlib).
        verbose: print the decision (rank zero).
        strict: raise when the callback's own work fails. Default: warn once and keep training
            (a round whose scores failed is skipped; the run is not given up on missing scores).

    Attributes:
        history: one dict of scores per round (``epoch``, ``s_o``, ``s_s``, ``s_t``, ``s_F``,
            ``s_Fv``, ``v_t``, ``drift``, ``scale``, ``saturated``, ``stalled``, ...).
        gave_up: whether the rule fired. ``reason``: its message. ``decision``: the
            :class:`~lightning_ttp.spectral.GiveUpDecision`; ``decided``: whether it is final.
            ``layers``: the monitored layers.
    """

    def __init__(
        self,
        checkpoint_epoch: int = 10,
        t1: float | None = None,
        target_accuracy: float | None = None,
        mode: Literal["stop", "warn"] = "stop",
        layers: Sequence[str] | None = None,
        conv_stages: int = 2,
        num_samples: int = 1000,
        accuracy_metric: str | None = None,
        config: SpectralConfig | None = None,
        keep_above: float | Literal["auto"] | None = "auto",
        trial: Any | None = None,
        on_give_up: GiveUpHook | None = None,
        output_fn: Callable[[Any, Any], Any] | None = None,
        target_fn: Callable[[Any], Any] | None = None,
        plot: bool = True,
        verbose: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if int(checkpoint_epoch) != checkpoint_epoch or checkpoint_epoch < 1:
            raise ValueError(f"checkpoint_epoch must be a whole number of epochs >= 1, got {checkpoint_epoch!r}")
        if mode not in ("stop", "warn"):
            raise ValueError(f"mode must be 'stop' (set trainer.should_stop) or 'warn' (log only), got {mode!r}")
        if int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(
                f"num_samples must be an integer >= 2 (rows of the activation matrix), got {num_samples!r}"
            )
        if target_accuracy is not None and not 0.0 <= target_accuracy <= 1.0:
            raise ValueError(
                f"target_accuracy is a predicted accuracy in [0, 1], got {target_accuracy!r} (pass 0.65, not 65)"
            )
        if not (keep_above is None or keep_above == "auto" or 0.0 <= float(keep_above) <= 1.0):
            raise ValueError(f"keep_above must be an accuracy in [0, 1], 'auto' or None, got {keep_above!r}")
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of module names, e.g. [{layers!r}], not a string")
        if layers is not None and not layers:
            raise ValueError("EarlyGiveUp(layers=[]) monitors nothing; pass None to find the layers")
        config = config if config is not None else SpectralConfig()
        self.config = config if t1 is None else replace(config, t1=float(t1))
        self.checkpoint_epoch = int(checkpoint_epoch)
        self.target_accuracy = target_accuracy
        self.mode = mode
        self.layer_names = None if layers is None else list(layers)
        self.conv_stages = int(conv_stages)
        self.num_samples = int(num_samples)
        self.accuracy_metric = accuracy_metric
        self.keep_above = keep_above
        self.trial = trial
        self._on_give_up_fn = on_give_up
        self.output_fn = output_fn
        self.target_fn = target_fn
        self.plot = plot
        self.verbose = verbose
        self.strict = strict
        self.state = GiveUpState()
        self._recorder = ActivationRecorder(num_samples, self.layer_names, self.conv_stages)
        self._accuracy: Any = None
        self._classes: int | None = None
        self._logits: torch.Tensor | None = None
        self._logit_hook: Any = None
        self._round: tuple[list[torch.Tensor], list[float], list[int]] | None = None
        self._subset: Any = None
        self._noted: set[str] = set()

    @property
    def t1(self) -> float:
        return self.config.t1

    # ------------------------------------------------------------------ public state
    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    @property
    def decision(self) -> GiveUpDecision | None:
        return self.state.decision

    @property
    def gave_up(self) -> bool:
        return self.state.gave_up

    @property
    def decided(self) -> bool:
        """Whether the checkpoint decision has been taken (``insufficient`` does not count)."""
        return self.state.decision is not None and self.state.decision.final

    @property
    def reason(self) -> str | None:
        return None if self.state.decision is None else self.state.decision.reason

    @property
    def layers(self) -> list[str]:
        return list(self.state.layers)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            checkpoint_epoch=self.checkpoint_epoch, t1=self.t1, layers=self.layer_names, mode=self.mode
        )

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = GiveUpState.from_dict(state_dict)

    # ------------------------------------------------------------------ failure policy
    def _fail(self, where: str, error: BaseException) -> None:
        """Raise with ``strict=True``; else warn once per kind and keep training."""
        if self.strict:
            raise error
        self._warn_once(
            f"fail:{where}",
            f"EarlyGiveUp: {where} failed ({type(error).__name__}: {error}). Training continues (this round is not "
            "scored); pass EarlyGiveUp(strict=True) to make this an error.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            rank_zero_warn(message, category=UserWarning)

    def _guard(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn once and continue
            self._fail(where, exc)
            return None

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        # a new fit starts from nothing (a resumed fit restores the state after this hook)
        self.state = GiveUpState()
        self._recorder.reset()
        self._subset = None
        self._round = None
        self._noted = set()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove_logit_hook()
        if self.plot and self.state.history:
            self._guard("the give-up plot", self._save_plot, trainer)
        if trainer.world_size > 1:  # the other ranks wait for rank zero's plot before tearing down
            trainer.strategy.barrier("lightning_ttp.give_up.fit_end")

    # ------------------------------------------------------------------ validation rounds
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if _is_fitting(trainer):
            self._guard("attaching the recorder", self._start_round, trainer, pl_module)

    def _start_round(self, trainer: Any, pl_module: Any) -> None:
        world = max(1, int(trainer.world_size))
        self._recorder.num_samples = math.ceil(self.num_samples / world)
        self._recorder.attach(pl_module)
        if self.accuracy_metric is None:
            self._remove_logit_hook()
            self._logit_hook = pl_module.register_forward_hook(self._capture_logits)
            if self._accuracy is not None:
                self._accuracy.reset()

    def _capture_logits(self, module: Any, inputs: Any, output: Any) -> None:
        if self._logits is None:
            try:
                self._logits = logits_of(output).detach()
            except TypeError:
                self._logits = None

    def _remove_logit_hook(self) -> None:
        if self._logit_hook is not None:
            self._logit_hook.remove()
            self._logit_hook = None

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if _is_fitting(trainer):
            self._logits = None
            self._recorder.start_batch(self._batch_size(batch), record=dataloader_idx == 0)

    def _targets(self, batch: Any) -> Any:
        try:
            return split_batch(batch, output_fn=self.output_fn, target_fn=self.target_fn, who="EarlyGiveUp")[1]
        except TypeError:
            return None

    def _batch_size(self, batch: Any) -> int | None:
        targets = self._targets(batch)
        for part in (targets, batch):
            try:
                return num_samples_in(part)
            except TypeError:
                continue
        return None

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not _is_fitting(trainer):
            return
        self._guard("recording the activations", self._recorder.end_batch)
        logits, self._logits = self._logits, None
        if dataloader_idx == 0 and self.accuracy_metric is None and logits is not None:
            self._guard("validation accuracy", self._update_accuracy, logits, self._targets(batch))

    def _update_accuracy(self, logits: torch.Tensor, targets: Any) -> None:
        batch = give_up_state.accuracy_predictions(logits, targets)
        if batch is None:
            return
        from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

        classes, preds, targets = batch
        if self._accuracy is None or self._classes != classes:
            self._classes = classes
            self._accuracy = MulticlassAccuracy(classes, average="micro") if classes > 2 else BinaryAccuracy()
        self._accuracy = self._accuracy.to(logits.device)
        self._accuracy.update(preds, targets)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not _is_fitting(trainer):
            return
        self._remove_logit_hook()
        self._round = self._guard("computing the spectra", self._gather_spectra, trainer)
        self._recorder.detach()
        if self._round is None:
            return
        v_t = None
        if self.accuracy_metric is None and self._accuracy is not None and self._accuracy.update_count > 0:
            v_t = self._guard("validation accuracy", lambda: float(self._accuracy.compute()))
        scores = self._guard("scoring", self._score, trainer, v_t)
        if scores is not None:
            self._log(pl_module, scores)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not _is_fitting(trainer) or self._round is None:
            return
        self._round = None
        if self.accuracy_metric is not None and self.state.history:
            self._guard("scoring s_Fv", self._fill_accuracy, trainer)
        self._after_round(trainer, pl_module)

    # ------------------------------------------------------------------ no validation loop
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.enable_validation:
            return
        self._warn_once(
            "no_val",
            "EarlyGiveUp: this fit has no validation loop; the spectra are taken on a fixed subset of "
            f"min({self.num_samples}, N) distinct training samples (an extra eval-mode forward pass per epoch), and "
            "s_Fv needs accuracy_metric=.",
        )
        ok = self._guard("scoring the training subset", self._score_subset, trainer, pl_module)
        if ok:
            self._after_round(trainer, pl_module)

    def _score_subset(self, trainer: Any, pl_module: Any) -> bool:
        if self._subset is None:
            loader = trainer.train_dataloader
            if not isinstance(loader, torch.utils.data.DataLoader):
                self._warn_once(
                    "loader", "EarlyGiveUp: no single training DataLoader to take a subset from; no scores."
                )
                return False
            self._subset, _ = sample_subset(loader, self.num_samples, seed=0)
        self._recorder.num_samples = self.num_samples
        self._recorder.attach(pl_module)
        try:
            inputs, _ = split_batch(self._subset, output_fn=self.output_fn, target_fn=self.target_fn, who="EarlyGiveUp")
            inputs = tree_map(lambda t: t.to(pl_module.device) if isinstance(t, torch.Tensor) else t, inputs)
            # modes (a frozen BatchNorm stays in eval mode), buffers and RNG streams come back as they were
            with preserve_state(pl_module), torch.no_grad():
                pl_module.eval()
                self._recorder.start_batch(self._batch_size(self._subset))
                if self.output_fn is not None:
                    self.output_fn(pl_module, inputs)
                else:
                    pl_module(inputs)
                self._recorder.end_batch()
            mats = self._recorder.matrices()
        finally:
            self._recorder.detach()
        self._round = self._spectra(mats)
        self._score(trainer, None)
        self._round = None
        if self.state.history:
            self._log_to_loggers(trainer, give_up_state.score_metrics(self.state.history[-1]))
        return True

    # ------------------------------------------------------------------ spectra and scores
    def _gather_spectra(self, trainer: Any) -> tuple[list[torch.Tensor], list[float], list[int]]:
        mats = self._recorder.matrices()
        world = max(1, int(trainer.world_size))
        if world > 1:
            mats = [self._gather(trainer, m) for m in mats]
        return self._spectra(mats)

    def _gather(self, trainer: Any, mat: torch.Tensor) -> torch.Tensor:
        """The rows of every rank, in the order of the validation set: rank r's j-th row is sample
        j·W + r under Lightning's ``DistributedSampler(shuffle=False)``; the first ``num_samples``."""
        per = self._recorder.num_samples
        device = trainer.strategy.root_device
        padded = torch.zeros(per, mat.shape[1], device=device)
        valid = torch.zeros(per, device=device)
        padded[: mat.shape[0]] = mat.to(device)
        valid[: mat.shape[0]] = 1.0
        rows = trainer.strategy.all_gather(padded)  # (W, per, d)
        keep = trainer.strategy.all_gather(valid)  # (W, per)
        rows = rows.transpose(0, 1).reshape(-1, rows.shape[-1])
        keep = keep.transpose(0, 1).reshape(-1) > 0
        return rows[keep][: self.num_samples]

    def _spectra(self, mats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[float], list[int]]:
        spectra = layer_spectra(mats)
        self.state.layers = [layer.label for layer in self._recorder.layers or []]
        if self._recorder.missing:
            self._warn_once(
                "missing",
                f"EarlyGiveUp(layers=...): no module named {self._recorder.missing} ran in the forward pass; "
                "they are not monitored.",
            )
        if not mats:
            self._warn_once(
                "no_layers",
                "EarlyGiveUp: found no representation to monitor (no nn.Linear head and no convolution ran); "
                "pass layers=[...] with module names. Training continues without scores.",
            )
        return spectra

    def _score(self, trainer: Any, v_t: float | None) -> Scores | None:
        assert self._round is not None
        values, scales, units = self._round
        if not values:
            return None
        st = self.state
        st.add_round(values, scales, units, self.config.t0)
        epoch = int(trainer.current_epoch) + 1
        scores = compute_scores(st.spectra, epoch, v_t, self.config, st.units, st.scales)
        st.history.append(give_up_state.score_entry(scores))
        if self.trial is not None and self.accuracy_metric is None:
            self._report_trial(st.history[-1])
        return scores

    def _log(self, pl_module: Any, scores: Scores) -> None:
        # the scores are the same on every rank (gathered rows); sync_dist averages equal values and
        # spares the user Lightning's "use sync_dist=True" warning under DDP
        for key, value in give_up_state.score_metrics(give_up_state.score_entry(scores)).items():
            try:
                pl_module.log(key, value, on_epoch=True, sync_dist=True)
            except Exception as err:  # noqa: BLE001 - logging must never break training
                self._warn_once("log", f"EarlyGiveUp: could not log {key}: {err}")

    def _log_to_loggers(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for lg in trainer.loggers:  # pl_module.log is not allowed in on_validation_end
                lg.log_metrics(metrics, step=trainer.global_step)

    def _fill_accuracy(self, trainer: Any) -> None:
        """v_t from a metric logged by the user (known only after the module's own epoch-end hook)."""
        value = trainer.callback_metrics.get(self.accuracy_metric)
        if value is None:
            self._warn_once(
                "no_metric",
                f"EarlyGiveUp: metric {self.accuracy_metric!r} was not logged; s_Fv is not computed. "
                f"Logged metrics: {sorted(trainer.callback_metrics)}",
            )
        else:
            v = float(value)
            if 1.0 < v <= 100.0:
                self._warn_once("percent", f"EarlyGiveUp: {self.accuracy_metric}={v:g} looks like a percentage; /100.")
                v /= 100.0
            entry = self.state.history[-1]
            scores = compute_scores(
                self.state.spectra, int(entry["epoch"]), v, self.config, self.state.units, self.state.scales
            )
            self.state.history[-1] = give_up_state.score_entry(scores)
            if not scores.nonfinite_layers and math.isfinite(scores.s_Fv):
                self._log_to_loggers(trainer, {"give_up/s_Fv": scores.s_Fv, "give_up/v_t": v})
        if self.trial is not None:
            self._report_trial(self.state.history[-1])

    def _report_trial(self, entry: dict[str, Any]) -> None:
        """s_Fv (a predicted accuracy); s_F without v_t; nothing where both are undefined."""
        value = give_up_state.trial_value(entry)
        if value is not None:
            self.trial.report(value, step=int(entry["epoch"]))

    # ------------------------------------------------------------------ decision
    def _after_round(self, trainer: Any, pl_module: Any) -> None:
        st = self.state
        keep_above = give_up_state.keep_above_threshold(self.keep_above, self._classes)
        taken = give_up_state.round_decision(st, self.config, self.checkpoint_epoch, self.target_accuracy, keep_above)
        if taken is None:
            return  # only divergence acts before the checkpoint or after the decision
        epoch, decision = taken
        give_up = decision.give_up
        if self.mode == "stop":
            # the same scores on every rank; reduced anyway, as Lightning's EarlyStopping does
            give_up = bool(trainer.strategy.reduce_boolean_decision(give_up, all=False))
        if give_up and not decision.give_up:
            decision = GiveUpDecision(True, "other_rank", f"epoch {epoch}: another rank gave up")
        st.decision = decision
        st.decision_epoch = epoch
        st.gave_up = give_up
        if self.verbose:
            verb = "giving up" if give_up and self.mode == "stop" else "would give up" if give_up else "continue"
            if decision.final or give_up:
                rank_zero_info(f"EarlyGiveUp ({verb}): {decision.reason}")
        if not decision.final:
            return
        self._log_to_loggers(trainer, {"give_up/gave_up": float(give_up)})
        if self.plot:
            self._guard("the give-up plot", self._save_plot, trainer)
        if not give_up:
            return
        if self.mode == "stop":
            trainer.should_stop = True
            min_epochs = trainer.min_epochs or 0
            if epoch < min_epochs:
                rank_zero_info(f"EarlyGiveUp: stop deferred by Lightning until min_epochs={min_epochs} are done.")
        self.on_give_up(trainer, pl_module, decision)
        if self.trial is not None and self.mode == "stop":
            import optuna

            raise optuna.TrialPruned(f"EarlyGiveUp: {decision.reason}")

    def on_give_up(self, trainer: Any, pl_module: Any, decision: GiveUpDecision) -> None:
        """Called once when the rule fires (override, or pass ``on_give_up=`` to the constructor)."""
        if self._on_give_up_fn is not None:
            self._on_give_up_fn(trainer, pl_module, decision)

    # ------------------------------------------------------------------ picture
    def _save_plot(self, trainer: Any) -> str | None:
        from ..report.plots import matplotlib_available, plot_give_up, save_figure

        directory = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: read on every rank
        if not trainer.is_global_zero:
            return None
        if not matplotlib_available():
            self._warn_once("plot", "EarlyGiveUp: matplotlib is not installed; no plot (pip install matplotlib).")
            return None
        d = self.state.decision
        fig = plot_give_up(
            self.state.history,
            t1=self.t1,
            checkpoint_epoch=self.checkpoint_epoch,
            decision_epoch=None if d is None or not d.final else self.state.decision_epoch,
            decision=None if d is None else f"{d.kind}{' (gave up)' if self.state.gave_up else ''}",
        )
        path = save_figure(fig, os.path.join(directory, "give_up_scores.png"))
        tensorboard = tuple(ns.loggers.TensorBoardLogger for ns in installed_namespaces())
        for logger in trainer.loggers:
            if isinstance(logger, tensorboard):
                logger.experiment.add_figure("give_up/scores", fig, global_step=trainer.global_step)
        return path
