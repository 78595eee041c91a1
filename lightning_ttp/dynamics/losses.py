"""Losses in function space: value, per-sample gradient, curvature and error.

Every simulator works with the network outputs ``f`` of shape ``(..., N, C)`` (an optional
leading "path" dimension for Monte Carlo) and needs, at every step, the gradient of the
*batch-mean* loss with respect to the outputs. We write it as

    ∇_f L_B(f) = w ⊙ G(f),      G_i = ∂ℓ_i / ∂f_i,   w_i = 1/|B| for i ∈ B, 0 otherwise,

where ℓ_i is the per-sample loss exactly as PyTorch's default ``reduction="mean"`` averages
it, so that ``L_B = Σ_i w_i ℓ_i`` is the number the user's training step reports:

* cross-entropy: ℓ_i = −Σ_c q_ic log softmax(f_i)_c (``q`` = one-hot or probability targets,
  with label smoothing q ← (1−s) q + s/C, as :func:`torch.nn.functional.cross_entropy`);
* MSE: ``mse_loss`` averages over all N·C elements, so ℓ_i = (1/C) Σ_c (f_ic − y_ic)²;
* BCE-with-logits: likewise ℓ_i = (1/C) Σ_c [softplus(f_ic) − y_ic f_ic];
* any callable ``loss(outputs, targets)``: gradients by autograd, assuming the callable is a
  mean over samples (PyTorch's default reduction), i.e. G = N · ∇_f loss(f, y).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .batch import Batch

__all__ = [
    "BCEWithLogits",
    "CallableLoss",
    "CrossEntropy",
    "Loss",
    "MSE",
    "TokenCrossEntropy",
    "get_loss",
    "token_loss",
]


class Loss:
    """Base class. Subclasses implement :meth:`per_sample` and :meth:`per_sample_grad`."""

    name: str = "loss"
    classification: bool = False

    def prepare_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """Targets in the dtype/shape the loss needs (called once before simulating)."""
        return targets

    def per_sample(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_i for every sample, shape ``f.shape[:-1]``."""
        raise NotImplementedError

    def value(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over the N samples (last-but-one axis), shape ``f.shape[:-2]``."""
        return self.per_sample(f, y).mean(dim=-1)

    def per_sample_grad(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """G_i = ∂ℓ_i/∂f_i, same shape as ``f``."""
        raise NotImplementedError

    def value_and_grad(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, per-sample gradient G) in one pass where the loss allows it."""
        return self.value(f, y), self.per_sample_grad(f, y)

    def value_and_batch_gradient(self, f: torch.Tensor, y: torch.Tensor, batch: Batch
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the N samples, the batch gradient w ⊙ G in the layout of
        :meth:`~lightning_ttp.dynamics.batch.Batch.gradient`). A loss may form G on the
        batch's rows only (cross-entropy does)."""
        value, g = self.value_and_grad(f, y)
        return value, batch.gradient(g)

    def sample_curvature(self, f: torch.Tensor, y: torch.Tensor) -> float:
        """max_i λ_max(∂²ℓ_i/∂f_i²): the loss curvature used by the stability diagnostic."""
        raise NotImplementedError

    def sample_hessian(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Per-sample Hessians ∂²ℓ_i/∂f_i² (N, C, C) for f of shape (N, C), or ``None`` if unknown."""
        return None

    def error(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Training error (1 − accuracy), shape ``f.shape[:-2]``; ``None`` for regression."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _smoothed_distribution(y: torch.Tensor, num_classes: int, smoothing: float, dtype) -> torch.Tensor:
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        q = F.one_hot(y.long(), num_classes).to(dtype)
    else:
        q = y.to(dtype)
    if smoothing:
        q = (1.0 - smoothing) * q + smoothing / num_classes
    return q


def _log_softmax(f: torch.Tensor) -> torch.Tensor:
    """log softmax over the class axis (last). Computed on a class-major view: PyTorch's CPU
    kernel is several times slower on a short contiguous last axis (C of 2–20 classes) than
    on a strided one, and the simulators call this at every step."""
    if f.dim() < 2:
        return torch.log_softmax(f, dim=-1)
    return torch.log_softmax(f.transpose(-1, -2), dim=-2).transpose(-1, -2)


class CrossEntropy(Loss):
    """Softmax cross-entropy (``F.cross_entropy``), class-index or probability targets."""

    name = "cross_entropy"
    classification = True

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self._q_cache: tuple | None = None
        #: token targets equal to this are masked (used by :func:`token_loss` for sequence outputs)
        self.ignore_index = int(ignore_index)

    def prepare_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        if targets.dim() == 1:
            if targets.is_floating_point():
                raise ValueError(
                    f"cross-entropy needs integer class indices or (N, {num_outputs}) class probabilities, but the "
                    f"targets are 1-D {targets.dtype} values: for regression pass loss='mse'; for class labels stored "
                    "as floats pass target_fn=lambda batch: batch[1].long()."
                )
            if targets.numel() and (targets.min() < 0 or targets.max() >= num_outputs):
                raise ValueError(
                    f"cross-entropy targets must be class indices in [0, {num_outputs}); "
                    f"got range [{int(targets.min())}, {int(targets.max())}]"
                )
            return targets
        if targets.shape[-1] != num_outputs:
            raise ValueError(f"probability targets need {num_outputs} columns, got {tuple(targets.shape)}")
        return targets

    def _q(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # the simulators call this every step with the same targets tensor: keep the last one
        # (held, so its identity cannot be reused; its version catches in-place edits; inference
        # tensors have no version: not cached)
        if y.is_inference():
            return _smoothed_distribution(y, f.shape[-1], self.label_smoothing, f.dtype).to(f.device)
        cache = self._q_cache
        key = (y._version, f.shape[-1], f.dtype, f.device, self.label_smoothing)
        if cache is None or cache[0] is not y or cache[1] != key:
            q = _smoothed_distribution(y, f.shape[-1], self.label_smoothing, f.dtype).to(f.device)
            self._q_cache = cache = (y, key, q)
        return cache[2]

    def per_sample(self, f, y):
        return -(self._q(f, y) * _log_softmax(f)).sum(-1)

    def per_sample_grad(self, f, y):
        q = self._q(f, y)
        return _log_softmax(f).exp() * q.sum(-1, keepdim=True) - q

    def value_and_grad(self, f, y):
        q = self._q(f, y)
        logp = _log_softmax(f)
        value = -(q * logp).sum(-1).mean(-1)
        if y.dim() == 1:  # class indices: every row of q sums to 1 (with label smoothing too)
            return value, logp.exp() - q
        return value, logp.exp() * q.sum(-1, keepdim=True) - q

    def value_and_batch_gradient(self, f, y, batch):
        if batch.index is None:
            return super().value_and_batch_gradient(f, y, batch)
        q = self._q(f, y)
        logp = _log_softmax(f)
        value = -(q * logp).sum(-1).mean(-1)
        p_rows, q_rows = batch.rows(logp).exp(), q[batch.index]  # softmax only where the batch needs it
        g = p_rows - q_rows if y.dim() == 1 else p_rows * q_rows.sum(-1, keepdim=True) - q_rows
        return value, batch.weight[..., None] * g

    def sample_hessian(self, f, y):
        p = torch.softmax(f.double(), dim=-1)
        return (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) * self._q(f, y).double().sum(-1)[:, None, None]

    def sample_curvature(self, f, y):
        p = torch.softmax(f.reshape(-1, f.shape[-1]).double(), dim=-1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return float(torch.linalg.eigvalsh(h)[:, -1].max()) if h.numel() else 0.0

    def error(self, f, y):
        labels = y if y.dim() == 1 else y.argmax(-1)
        return (f.argmax(-1) != labels).to(f.dtype).mean(-1)

    def describe(self):
        return {"name": self.name, "label_smoothing": self.label_smoothing}


class TokenCrossEntropy(Loss):
    """Cross-entropy over the tokens of sequence outputs, PyTorch's ``ignore_index`` masking.

    The model outputs ``(N, T, C)`` logits, flattened to one row of ``T·C`` outputs per sample;
    targets are ``(N, T)`` class indices, ``ignore_index`` marking tokens without a label.
    ``F.cross_entropy`` averages over the labelled tokens of a batch; here sample i carries

        ℓ_i = Σ_t m_it ℓ_it / m̄,   m_it = [y_it ≠ ignore_index],  m̄ = mean_i Σ_t m_it

    (m̄ over the kernel subset), so the mean over samples is exactly the token mean on the full
    subset and, for mini-batches, the token mean up to the batch's token count.
    """

    name = "token_cross_entropy"
    classification = True

    def __init__(self, num_classes: int, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.inner = CrossEntropy(label_smoothing)
        self.mean_tokens = 1.0

    def prepare_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        if targets.dim() != 2 or targets.is_floating_point():
            raise ValueError(f"token targets must be (N, T) class indices, got {tuple(targets.shape)} {targets.dtype}")
        if targets.shape[1] * self.num_classes != num_outputs:
            raise ValueError(f"{targets.shape[1]} tokens × {self.num_classes} classes != {num_outputs} outputs")
        mask = targets != self.ignore_index
        if not bool(mask.any()):
            raise ValueError(f"every token target equals ignore_index={self.ignore_index}: nothing to learn")
        labels = targets[mask]
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"token targets must be in [0, {self.num_classes}) or {self.ignore_index}")
        self.mean_tokens = float(mask.sum(1).double().mean())
        return targets

    def _split(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = f.reshape(*f.shape[:-1], y.shape[-1], self.num_classes)
        mask = (y != self.ignore_index).to(f.dtype)
        return tokens, y.clamp_min(0), mask

    def per_sample(self, f, y):
        tokens, labels, mask = self._split(f, y)
        return (self.inner.per_sample(tokens, labels) * mask).sum(-1) / self.mean_tokens

    def per_sample_grad(self, f, y):
        tokens, labels, mask = self._split(f, y)
        grad = self.inner.per_sample_grad(tokens, labels) * mask[..., None] / self.mean_tokens
        return grad.reshape(f.shape)

    def sample_curvature(self, f, y):
        tokens, labels, _ = self._split(f, y)
        return self.inner.sample_curvature(tokens, labels) / self.mean_tokens

    def error(self, f, y):
        tokens, labels, mask = self._split(f, y)
        wrong = (tokens.argmax(-1) != labels).to(f.dtype) * mask
        return wrong.sum(dim=(-1, -2)) / mask.sum()

    def describe(self):
        return {"name": self.name, "num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "label_smoothing": self.inner.label_smoothing}


class MSE(Loss):
    """Mean squared error averaged over all N·C elements (``F.mse_loss``)."""

    name = "mse"

    def prepare_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        if targets.dim() == 1:
            targets = targets[:, None]
        if targets.shape[-1] != num_outputs:
            raise ValueError(f"MSE targets need {num_outputs} columns, got {tuple(targets.shape)}")
        return targets

    def per_sample(self, f, y):
        return ((f - y.to(f.dtype)) ** 2).mean(-1)

    def per_sample_grad(self, f, y):
        return 2.0 * (f - y.to(f.dtype)) / f.shape[-1]

    def sample_curvature(self, f, y):
        return 2.0 / f.shape[-1]

    def sample_hessian(self, f, y):
        n, c = f.shape
        return torch.eye(c, dtype=torch.float64, device=f.device).expand(n, c, c) * (2.0 / c)

    def error(self, f, y):
        # One-hot regression targets (a common "MSE for classification" set-up): argmax error.
        if f.shape[-1] > 1 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(-1) == 1).all()):
            return (f.argmax(-1) != y.argmax(-1)).to(f.dtype).mean(-1)
        return None


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits averaged over all elements (``F.binary_cross_entropy_with_logits``)."""

    name = "bce_with_logits"
    classification = True

    def prepare_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        if targets.dim() == 1:
            targets = targets[:, None]
        if targets.shape[-1] != num_outputs:
            raise ValueError(f"BCE targets need {num_outputs} columns, got {tuple(targets.shape)}")
        return targets

    def per_sample(self, f, y):
        y = y.to(f.dtype)
        return (F.softplus(f) - y * f).mean(-1)

    def per_sample_grad(self, f, y):
        return (torch.sigmoid(f) - y.to(f.dtype)) / f.shape[-1]

    def sample_curvature(self, f, y):
        s = torch.sigmoid(f)
        return float((s * (1 - s)).max()) / f.shape[-1] if f.numel() else 0.0

    def sample_hessian(self, f, y):
        s = torch.sigmoid(f.double())
        return torch.diag_embed(s * (1 - s) / f.shape[-1])

    def error(self, f, y):
        return ((f > 0) != (y > 0.5)).to(f.dtype).mean(dim=(-1, -2))


class CallableLoss(Loss):
    """Any ``loss(outputs, targets) -> scalar`` with PyTorch's mean-over-samples reduction.

    Gradients come from autograd on the outputs: G = N · ∇_f loss(f, y). With C == 1 and 1-D
    targets the outputs are passed as shape ``(N,)``, as a model with a scalar head would give.
    """

    name = "callable"

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def _call(self, f2d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if f2d.shape[-1] == 1 and y.dim() == 1:
            return self.fn(f2d[:, 0], y)
        return self.fn(f2d, y)

    def value(self, f, y):
        flat = f.reshape(-1, f.shape[-2], f.shape[-1])
        vals = torch.stack([self._call(fp, y).detach().to(f.dtype) for fp in flat])
        return vals.reshape(f.shape[:-2])

    def per_sample(self, f, y):
        raise NotImplementedError("a callable loss only gives the batch mean")

    def per_sample_grad(self, f, y):
        flat = f.reshape(-1, f.shape[-2], f.shape[-1])
        out = []
        for fp in flat:
            fp = fp.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self._call(fp, y), fp)
            out.append(g * fp.shape[0])
        return torch.stack(out).reshape(f.shape)

    def sample_curvature(self, f, y):
        f2 = f.reshape(-1, f.shape[-1])[:32].detach()
        ys = y[:32]
        worst = 0.0
        for i in range(f2.shape[0]):
            h = torch.autograd.functional.hessian(lambda z, i=i: self._call(z[None], ys[i : i + 1]), f2[i])
            worst = max(worst, float(torch.linalg.eigvalsh(h.double().reshape(f2.shape[1], -1))[-1]))
        return worst

    def error(self, f, y):
        if f.shape[-1] > 1 and y.dim() == 1 and not y.is_floating_point():
            return (f.argmax(-1) != y).to(f.dtype).mean(-1)
        return None


_ALIASES = {
    "cross_entropy": CrossEntropy,
    "ce": CrossEntropy,
    "mse": MSE,
    "mse_loss": MSE,
    "bce": BCEWithLogits,
    "bce_with_logits": BCEWithLogits,
    "binary_cross_entropy_with_logits": BCEWithLogits,
}


def get_loss(loss: str | Loss | Callable | torch.nn.Module, **kwargs: Any) -> Loss:
    """Resolve a loss name, a :class:`Loss`, a ``torch.nn`` loss module or a callable.

    ``torch.nn.CrossEntropyLoss`` / ``MSELoss`` / ``BCEWithLogitsLoss`` with default
    reduction map to the closed-form losses (label smoothing is read from the module).
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        key = loss.lower()
        if key not in _ALIASES:
            raise ValueError(f"unknown loss {loss!r}; use one of {sorted(_ALIASES)} or pass a callable")
        return _ALIASES[key](**kwargs)
    if isinstance(loss, torch.nn.CrossEntropyLoss) and loss.reduction == "mean" and loss.weight is None:
        if loss.ignore_index >= 0:  # a real class index can be ignored: autograd on the module itself
            return CallableLoss(loss)
        return CrossEntropy(label_smoothing=loss.label_smoothing, ignore_index=loss.ignore_index)
    if isinstance(loss, torch.nn.MSELoss) and loss.reduction == "mean":
        return MSE()
    if isinstance(loss, torch.nn.BCEWithLogitsLoss) and loss.reduction == "mean" and loss.weight is None:
        if loss.pos_weight is None:
            return BCEWithLogits()
    if loss is F.cross_entropy:
        return CrossEntropy(**kwargs)
    if loss is F.mse_loss:
        return MSE()
    if loss is F.binary_cross_entropy_with_logits:
        return BCEWithLogits()
    if callable(loss):
        return CallableLoss(loss)
    raise TypeError(f"loss must be a name, a Loss or a callable, got {type(loss).__name__}")


def token_loss(loss: Loss, num_classes: int) -> Loss:
    """The token-level twin of a cross-entropy ``loss`` for ``(N, T, C)`` outputs and ``(N, T)``
    targets (:class:`TokenCrossEntropy`)."""
    module = getattr(loss, "fn", None)
    if isinstance(loss, CrossEntropy):
        return TokenCrossEntropy(num_classes, loss.ignore_index, loss.label_smoothing)
    if isinstance(module, torch.nn.CrossEntropyLoss) and module.weight is None and module.reduction == "mean":
        return TokenCrossEntropy(num_classes, module.ignore_index, module.label_smoothing)
    raise ValueError(f"sequence outputs (N, T, C) with (N, T) targets need a cross-entropy loss, got {loss.name!r}; "
                     "or pass output_fn=lambda model, batch: <(N, C) logits> to predict per sequence")
