"""``EarlyGiveUp``: stop runs that the DAI compression scores predict will not train.

Every validation round, forward hooks on the monitored hidden layers record the outputs
of the first ``num_samples`` validation samples (Lightning's own validation forward pass;
no extra pass). Their normalised singular values go into a history, from which the scores
of eq. (2)–(8) of Jain & Ramaswamy (DAI paper) are computed by
:mod:`lightning_ttp.spectral` and logged. At the checkpoint round (default: after epoch 10,
as in the paper) the give-up rule (:func:`lightning_ttp.spectral.decide`) decides whether
to stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from .._modes import preserve_modes
from ..spectral import GiveUpDecision, Scores, SpectralConfig, compute_scores, decide, spectrum_of
from ..spectral.spectra import global_avg_pool
from ._compat import bases

__all__ = ["EarlyGiveUp"]

_ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.PReLU,
    nn.Hardtanh,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
GiveUpHook = Callable[[Any, Any, GiveUpDecision], None]


def _fn_is_fit(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return getattr(fn, "value", fn) == "fit"


class EarlyGiveUp(*bases("Callback")):  # type: ignore[misc]
    r"""Give up early on a run whose hidden-layer spectra do not compress (DAI paper, Sec. III–VI).

    Per validation round t (t = ``trainer.current_epoch + 1``, completed training epochs):

    * σ_{tl} = normalised singular values of the (m × d_l) outputs of each monitored layer l;
    * s_ot (eq. 2–3, compression over the window of t0 rounds), s_st (eq. 4–5, shift of the
      spectrum towards decay), s_t = |log s_ot| + η s_st (eq. 6), s_F (eq. 7: 0 if s_ot >= t2
      and s_st <= δ, the saturated case) and, with a validation accuracy v_t, the predicted
      final accuracy s_Fv (eq. 8) — logged as ``give_up/s_o`` … ``give_up/s_Fv``, ``give_up/v_t``.

    At the checkpoint round: give up if all layers are dead, the activations are non-finite,
    the run is saturated, s_F < t1 (paper: 0.25), or s_Fv < ``target_accuracy``. See
    :func:`lightning_ttp.spectral.decide` for the exact order.

    Args:
        checkpoint_epoch: the decision is taken at the first validation round with
            t >= checkpoint_epoch (paper: 10). Lightning's ``min_epochs`` is respected:
            a stop requested earlier takes effect once ``min_epochs`` are done.
        t1: give-up threshold on s_F. ``None``: ``config.t1``.
        target_accuracy: optional threshold on s_Fv (the predicted final accuracy, in [0, 1]).
        mode: ``"stop"`` sets ``trainer.should_stop`` (any rank giving up stops all ranks,
            like Lightning's ``EarlyStopping``); ``"warn"`` only logs and prints.
        layers: module names (as in ``named_modules()``) to monitor. Default: every hidden
            ``nn.Linear`` except the last Linear (the output layer); when a Linear is directly
            followed (in registration order) by an activation module, that activation's output
            is used (post-activation, as in the paper).
        pool_conv: reduce convolutional feature maps (m, C, H, W) to (m, C) by global average
            pooling. Without it a conv layer's maps are flattened (large and slow).
        num_samples: m, the number of first validation samples recorded per round. The
            validation dataloader must give the same samples in the same order every round
            (Lightning does not shuffle validation data by default).
        accuracy_metric: name of a logged metric that holds the validation accuracy in [0, 1]
            (e.g. ``"val_acc"``). ``None``: the callback computes it from the model's outputs
            and the labels (``batch[1]``) with torchmetrics when the batch is ``(x, y)`` and
            ``validation_step`` calls ``self(x)``; otherwise s_Fv is omitted (noted once).
        config: :class:`~lightning_ttp.spectral.SpectralConfig` (t0, β, η, t2, δ, γ, normalisation).
        keep_above: never give up (saturated or s_F < t1) on a run whose v_t is already at least
            this value: it converged at a good accuracy (decision kind ``converged``).
        trial: an ``optuna.trial.Trial``: every round s_Fv (or s_F without v_t) is reported,
            and on give-up (``mode="stop"``) ``optuna.TrialPruned`` is raised.
        on_give_up: called as ``on_give_up(trainer, pl_module, decision)`` when the rule fires
            (in both modes). Subclasses can override :meth:`on_give_up` instead.
        verbose: print the decision (rank zero) at the checkpoint.
        strict: raise when computing the scores fails. Default: warn once and keep training
            (a round whose scores failed is skipped; at the checkpoint the run is not given up).
        spectra_dtype: working precision of the singular values (float32: ~2x faster than
            float64, normalised values within ~1e-4; see :func:`lightning_ttp.spectral.spectrum_of`).

    Attributes:
        history: one dict of scores per round (``epoch``, ``s_o``, ``s_s``, ``s_t``, ``s_F``,
            ``s_Fv``, ``v_t``, ``saturated``, ...).
        gave_up: whether the rule fired. ``reason``: its message (or the "continue" message).
        decision: the :class:`~lightning_ttp.spectral.GiveUpDecision` of the checkpoint.
    """

    def __init__(
        self,
        checkpoint_epoch: int = 10,
        t1: float | None = None,
        target_accuracy: float | None = None,
        mode: Literal["stop", "warn"] = "stop",
        layers: Sequence[str] | None = None,
        pool_conv: bool = False,
        num_samples: int = 1000,
        accuracy_metric: str | None = None,
        config: SpectralConfig | None = None,
        keep_above: float | None = None,
        trial: Any | None = None,
        on_give_up: GiveUpHook | None = None,
        verbose: bool = True,
        spectra_dtype: torch.dtype = torch.float32,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if int(checkpoint_epoch) != checkpoint_epoch or checkpoint_epoch < 1:
            raise ValueError(
                f"checkpoint_epoch must be a whole number of epochs >= 1, got {checkpoint_epoch!r}"
            )
        if mode not in ("stop", "warn"):
            raise ValueError(
                f"mode must be 'stop' (set trainer.should_stop) or 'warn' (log only), got {mode!r}"
            )
        if int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(
                f"num_samples must be an integer >= 2 (rows of the activation matrix), got {num_samples!r}"
            )
        if target_accuracy is not None and not 0.0 <= target_accuracy <= 1.0:
            raise ValueError(
                f"target_accuracy is a predicted accuracy in [0, 1], got {target_accuracy!r} "
                "(pass 0.65, not 65)"
            )
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of module names, e.g. [{layers!r}], not a string")
        self.config = config if config is not None else SpectralConfig()
        self.checkpoint_epoch = int(checkpoint_epoch)
        self.t1 = float(self.config.t1 if t1 is None else t1)
        self.target_accuracy = target_accuracy
        self.mode = mode
        self.layer_names: list[str] | None = list(layers) if layers is not None else None
        self.pool_conv = pool_conv
        self.num_samples = int(num_samples)
        self.accuracy_metric = accuracy_metric
        self.keep_above = keep_above
        self.trial = trial
        self._on_give_up_fn = on_give_up
        self.verbose = verbose
        self.spectra_dtype = spectra_dtype
        self.strict = strict

        self.history: list[dict[str, Any]] = []
        self.gave_up = False
        self.reason: str | None = None
        self.decision: GiveUpDecision | None = None
        self.decided = False
        self._spectra: list[list[torch.Tensor]] = []  # last t0 + 1 rounds x layers
        self._units: list[int] = []
        self._modules: list[tuple[str, nn.Module]] = []
        self._handles: list[Any] = []
        self._buffers: list[list[torch.Tensor]] = []
        self._counts: list[int] = []
        self._capturing = False
        self._logits: torch.Tensor | None = None
        self._correct = 0
        self._total = 0
        self._fallback = False
        self._train_inputs: list[Any] = []
        self._train_count = 0
        self._noted: set[str] = set()
        self._pending_fv = False
        self._round_failed = False

    # ------------------------------------------------------------------ identity / state
    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call: build the string once
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._generate_state_key(
                checkpoint_epoch=self.checkpoint_epoch, t1=self.t1, layers=self.layer_names, mode=self.mode
            )
            self.__dict__["_state_key"] = key
        return key

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "spectra": [[s.tolist() for s in rnd] for rnd in self._spectra],
            "units": list(self._units),
            "gave_up": self.gave_up,
            "reason": self.reason,
            "decided": self.decided,
            "decision_kind": None if self.decision is None else self.decision.kind,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._spectra = [
            [torch.tensor(s, dtype=torch.float64) for s in rnd] for rnd in state_dict.get("spectra", [])
        ]
        self._units = list(state_dict.get("units", []))
        self.gave_up = bool(state_dict.get("gave_up", False))
        self.reason = state_dict.get("reason")
        self.decided = bool(state_dict.get("decided", False))
        kind = state_dict.get("decision_kind")
        self.decision = None if kind is None else GiveUpDecision(self.gave_up, kind, self.reason or "")

    # ------------------------------------------------------------------ layer resolution
    def _resolve_layers(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        named = dict(pl_module.named_modules())
        if self.layer_names is not None:
            missing = [n for n in self.layer_names if n not in named]
            if missing:
                have = [n for n in named if n]
                raise ValueError(
                    f"EarlyGiveUp(layers=...): no module named {missing} in {type(pl_module).__name__}. "
                    f"Names available (from named_modules()): {have[:30]}{' ...' if len(have) > 30 else ''}"
                )
            if not self.layer_names:
                raise ValueError("EarlyGiveUp(layers=[]) monitors nothing; pass None for the default layers")
            return [(n, named[n]) for n in self.layer_names]
        order = [(n, m) for n, m in pl_module.named_modules() if n]
        linear_idx = [i for i, (_, m) in enumerate(order) if isinstance(m, nn.Linear)]
        if len(linear_idx) < 2:
            raise ValueError(
                f"EarlyGiveUp found {len(linear_idx)} nn.Linear layer(s) in {type(pl_module).__name__}; "
                "the default "
                "monitors the hidden Linear layers (all but the last). Pass layers=[...] with module names "
                "(e.g. a conv layer with pool_conv=True)."
            )
        chosen = []
        for i in linear_idx[:-1]:
            name, mod = order[i]
            if i + 1 < len(order) and isinstance(order[i + 1][1], _ACTIVATIONS):
                name, mod = order[i + 1]
            chosen.append((name, mod))
        return chosen

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, idx: int, is_conv: bool) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._capturing:
                return
            remaining = self.num_samples - self._counts[idx]
            if remaining <= 0 or not isinstance(output, torch.Tensor):
                return
            out = output.detach()[:remaining]
            if out.dim() > 2:
                if is_conv and self.pool_conv:
                    out = global_avg_pool(out)
                elif is_conv:
                    if "flatten" not in self._noted:
                        self._noted.add("flatten")
                        rank_zero_warn(
                            "EarlyGiveUp: flattening a convolutional feature map (slow, large); "
                            "pass pool_conv=True to use global average pooling."
                        )
                    out = out.reshape(out.shape[0], -1)
                else:  # e.g. Linear on (batch, tokens, features): average the middle dims
                    out = out.reshape(out.shape[0], -1, out.shape[-1]).mean(dim=1)
            self._buffers[idx].append(out.to(torch.float32))
            self._counts[idx] += int(out.shape[0])

        return hook

    def _logits_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._capturing_logits and isinstance(output, torch.Tensor):
            self._logits = output.detach()

    def _attach(self, pl_module: nn.Module) -> None:
        self._detach()
        self._buffers = [[] for _ in self._modules]
        self._counts = [0 for _ in self._modules]
        for i, (_, mod) in enumerate(self._modules):
            self._handles.append(mod.register_forward_hook(self._make_hook(i, isinstance(mod, _CONV))))
        self._capturing_logits = False
        if self.accuracy_metric is None:
            self._handles.append(pl_module.register_forward_hook(self._logits_hook))
        self._correct = 0
        self._total = 0
        self._capturing = True

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._capturing = False
        self._capturing_logits = False

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._modules = self._resolve_layers(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fallback = not bool(getattr(trainer, "enable_validation", True))
        if self._fallback:
            rank_zero_warn(
                "EarlyGiveUp: this fit has no validation loop; the spectra are taken on a fixed subset of "
                f"the first {self.num_samples} training samples (an extra forward pass per epoch), and "
                "s_Fv needs accuracy_metric= (no validation accuracy)."
            )

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not _fn_is_fit(trainer):
            return
        self._attach(pl_module)

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._handles:
            return
        self._capturing = dataloader_idx == 0 and min(self._counts, default=0) < self.num_samples
        self._capturing_logits = dataloader_idx == 0 and self.accuracy_metric is None
        self._logits = None

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._handles or dataloader_idx != 0 or self.accuracy_metric is not None:
            return
        try:
            self._accumulate_accuracy(batch)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn once and continue
            self._fail("validation accuracy", exc)

    def _accumulate_accuracy(self, batch: Any) -> None:
        logits, self._logits = self._logits, None
        labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) >= 2 else None
        if (
            logits is None
            or not isinstance(labels, torch.Tensor)
            or labels.dtype.is_floating_point
            or labels.dim() != 1
            or logits.shape[0] != labels.shape[0]
        ):
            return
        from torchmetrics.functional.classification import binary_accuracy, multiclass_accuracy

        labels = labels.to(logits.device)
        if not torch.isfinite(logits).all():
            acc = 0.0  # a diverged model's outputs are not predictions
        elif logits.dim() == 2 and logits.shape[1] >= 2:
            acc = float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro"))
        elif logits.dim() <= 2:
            acc = float(binary_accuracy(logits.reshape(-1).sigmoid(), labels))
        else:
            return
        self._correct += acc * labels.shape[0]
        self._total += int(labels.shape[0])

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._handles:
            return
        self._detach()
        self._score_round_safely(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not _fn_is_fit(trainer) or not self._round_pending:
            return
        self._round_pending = False
        if self._pending_fv:
            try:
                self._fill_fv_late(trainer)
            except Exception as exc:  # noqa: BLE001 - failure policy: warn once and continue
                self._fail("scoring s_Fv", exc)
        self._maybe_decide(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._fallback or self._train_count >= self.num_samples:
            return
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(x, torch.Tensor):
            if "fallback_batch" not in self._noted:
                self._noted.add("fallback_batch")
                rank_zero_warn(
                    "EarlyGiveUp: cannot take a training subset from a non-tensor batch; no scores."
                )
            self._train_count = self.num_samples
            return
        take = x.detach()[: self.num_samples - self._train_count].clone()
        self._train_inputs.append(take)
        self._train_count += int(take.shape[0])

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._fallback or not self._train_inputs:
            return
        self._attach(pl_module)
        self._capturing_logits = False
        try:
            # every submodule gets its own mode back (a frozen BatchNorm stays in eval mode)
            with preserve_modes(pl_module), torch.no_grad():
                pl_module.eval()
                for x in self._train_inputs:
                    pl_module(x.to(pl_module.device))
        finally:
            self._detach()
        self._score_round_safely(trainer, pl_module)
        self._round_pending = False
        self._maybe_decide(trainer, pl_module)

    # ------------------------------------------------------------------ scoring
    _round_pending = False
    _capturing_logits = False

    def _v_t(self, trainer: Any) -> float | None:
        if self.accuracy_metric is not None:
            value = trainer.callback_metrics.get(self.accuracy_metric)
            if value is None:
                return None
            v = float(value)
            if v > 1.0 and v <= 100.0:
                self._note_once(
                    "percent",
                    f"EarlyGiveUp: metric {self.accuracy_metric!r}={v:g} looks like a percentage; "
                    "divided by 100.",
                )
                v /= 100.0
            return v
        if self._total > 0:
            return self._correct / self._total
        return None

    def _fail(self, where: str, error: BaseException) -> None:
        """Failure policy: raise with ``strict=True``, else warn once per kind and keep training."""
        if self.strict:
            raise error
        key = f"fail:{where}"
        if key not in self._noted:
            self._noted.add(key)
            rank_zero_warn(
                f"EarlyGiveUp: {where} failed ({type(error).__name__}: {error}). Training continues "
                "(this round is not scored); pass EarlyGiveUp(strict=True) to make this an error.",
                category=UserWarning,
            )

    def _score_round_safely(self, trainer: Any, pl_module: Any) -> None:
        self._round_failed = False
        try:
            self._score_round(trainer, pl_module, log_with_module=True)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn once and continue
            self._buffers = [[] for _ in self._modules]
            self._pending_fv = False
            self._round_failed = True
            # the decision below must still run on this rank: the other ranks may call a collective
            self._round_pending = True
            self._fail("scoring", exc)

    def _note_once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            rank_zero_info(message)

    def _score_round(self, trainer: Any, pl_module: Any, log_with_module: bool) -> None:
        epoch = int(trainer.current_epoch) + 1
        spectra = []
        for i in range(len(self._modules)):
            if self._buffers[i]:
                spec = spectrum_of(torch.cat(self._buffers[i], dim=0), self.spectra_dtype)
            else:
                spec = spectrum_of(torch.empty(0, 1))
            spectra.append(spec.values)
            if i >= len(self._units):
                self._units.append(spec.units)
            else:
                self._units[i] = spec.units
        self._buffers = [[] for _ in self._modules]
        self._spectra.append(spectra)
        self._spectra = self._spectra[-(self.config.t0 + 1) :]
        v_t = self._v_t(trainer)
        self._pending_fv = v_t is None and self.accuracy_metric is not None
        if v_t is None and not self._pending_fv:
            self._note_once(
                "no_vt",
                "EarlyGiveUp: no validation accuracy (give accuracy_metric='val_acc' or return logits from "
                "self(x) with (x, y) batches); s_Fv is not computed.",
            )
        scores = compute_scores(self._spectra, epoch, v_t, self.config, self._units)
        self.history.append(self._entry(scores))
        self._round_pending = True
        if log_with_module:
            self._log(pl_module, scores)
        if self.trial is not None and not self._pending_fv:
            self._report_trial(scores)

    @staticmethod
    def _entry(scores: Scores) -> dict[str, Any]:
        d = scores.as_dict()
        return {k: v for k, v in d.items() if k not in ("per_layer_o", "per_layer_s")} | {
            "per_layer_o": list(scores.per_layer_o),
            "per_layer_s": list(scores.per_layer_s),
        }

    def _log(self, pl_module: Any, scores: Scores) -> None:
        metrics = {"s_o": scores.s_o, "s_s": scores.s_s, "s_t": scores.s_t, "s_F": scores.s_F}
        if math.isfinite(scores.v_t):
            metrics |= {"s_Fv": scores.s_Fv, "v_t": scores.v_t}
        for key, value in metrics.items():
            try:
                pl_module.log(f"give_up/{key}", float(value), on_epoch=True, sync_dist=True)
            except Exception as err:  # logging must never break training
                self._note_once("log", f"EarlyGiveUp: could not log give_up/{key}: {err}")

    def _fill_fv_late(self, trainer: Any) -> None:
        """v_t from a metric logged after the callbacks' on_validation_epoch_end (module's own hook)."""
        self._pending_fv = False
        v_t = self._v_t(trainer)
        if v_t is None:
            self._note_once(
                "no_metric",
                f"EarlyGiveUp: metric {self.accuracy_metric!r} was not logged; s_Fv is not computed. "
                f"Logged metrics: {sorted(trainer.callback_metrics)}",
            )
            if self.trial is not None:
                self._report_trial_entry(self.history[-1])
            return
        scores = compute_scores(self._spectra, int(self.history[-1]["epoch"]), v_t, self.config, self._units)
        self.history[-1] = self._entry(scores)
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({"give_up/s_Fv": scores.s_Fv, "give_up/v_t": v_t}, step=trainer.global_step)
        if self.trial is not None:
            self._report_trial(scores)

    def _report_trial(self, scores: Scores) -> None:
        self._report_trial_entry(self._entry(scores))

    def _report_trial_entry(self, entry: dict[str, Any]) -> None:
        value = entry["s_Fv"] if math.isfinite(entry["s_Fv"]) else entry["s_F"]
        if math.isfinite(value):
            self.trial.report(float(value), step=int(entry["epoch"]))

    # ------------------------------------------------------------------ decision
    def _maybe_decide(self, trainer: Any, pl_module: Any) -> None:
        failed, self._round_failed = self._round_failed, False
        if self.decided or not (self.history or failed):
            return
        # the round's epoch, as _score_round counts it (also when its scores failed on this rank)
        epoch = int(trainer.current_epoch) + 1 if failed else int(self.history[-1]["epoch"])
        if epoch < self.checkpoint_epoch:
            return
        if failed:
            # no scores on this rank: it does not give up, but still joins the decision of the others
            decision = GiveUpDecision(False, "error", f"epoch {epoch}: the scores could not be computed")
        else:
            decision = decide(Scores(**self.history[-1]), self.t1, self.target_accuracy, self.keep_above)
        give_up = decision.give_up
        if self.mode == "stop":
            # any rank giving up stops every rank (as Lightning's EarlyStopping)
            give_up = bool(trainer.strategy.reduce_boolean_decision(give_up, all=False))
        if give_up and not decision.give_up:
            decision = GiveUpDecision(True, "other_rank", f"epoch {epoch}: another rank gave up")
        self.decided = True
        self.decision = decision
        self.gave_up = give_up
        self.reason = decision.reason
        if self.verbose:
            verb = (
                "giving up"
                if (give_up and self.mode == "stop")
                else ("would give up" if give_up else "continue")
            )
            rank_zero_info(f"EarlyGiveUp ({verb}): {decision.reason}")
        if trainer.is_global_zero:
            for lg in trainer.loggers:  # pl_module.log is not allowed in on_validation_end
                lg.log_metrics({"give_up/gave_up": float(give_up)}, step=trainer.global_step)
        if not give_up:
            return
        min_epochs = getattr(trainer, "min_epochs", None) or 0
        if self.mode == "stop":
            trainer.should_stop = True
            if epoch < min_epochs:
                rank_zero_info(
                    f"EarlyGiveUp: stop deferred by Lightning until min_epochs={min_epochs} are done."
                )
        self.on_give_up(trainer, pl_module, decision)
        if self.trial is not None and self.mode == "stop":
            import optuna

            raise optuna.TrialPruned(f"EarlyGiveUp: {decision.reason}")

    def on_give_up(self, trainer: Any, pl_module: Any, decision: GiveUpDecision) -> None:
        """Called once when the rule fires (override, or pass ``on_give_up=`` to the constructor)."""
        if self._on_give_up_fn is not None:
            self._on_give_up_fn(trainer, pl_module, decision)
