"""A plain description of the user's optimiser, read from a ``torch.optim.Optimizer``.

The simulators never touch the optimiser itself: they take an :class:`OptimizerSpec`
(one :class:`GroupSpec` per parameter group) and a per-step learning-rate array of shape
``(T, num_groups)``. ``OptimizerSpec.replace(...)`` builds "what-if" variants (another lr,
momentum, ...) that reuse the same kernel.

Supported exactly (for a model linear in its parameters): ``torch.optim.SGD`` with any
momentum / dampening / Nesterov / (coupled) weight decay, per group. Approximated:
``Adam`` / ``AdamW`` (see ``docs/prediction.md``: a diagonal preconditioner estimated at w0
folded into the kernel, plus the bias-corrected EMA of the first moment). Anything else is
treated as SGD with its learning rate (and momentum, if the group has one) and a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["GroupSpec", "OptimizerSpec"]

_SGD_LIKE = {"SGD"}
_ADAM_LIKE = {"Adam": "adam", "AdamW": "adamw", "NAdam": "adam", "RAdam": "adam", "Adamax": "adam"}


@dataclass
class GroupSpec:
    """Hyper-parameters of one parameter group.

    SGD (PyTorch convention): with g_t = ∇L + λ w_t (coupled weight decay),
    b_0 = g_0, b_t = m b_{t−1} + (1 − d) g_t, update = g_t + m b_t (Nesterov) or b_t,
    w_{t+1} = w_t − η_t · update. Decoupled weight decay (AdamW): w ← w − η λ w before
    the update.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    num_params: int = 0

    def effective_lr_factor(self, kind: str) -> float:
        """Steady-state gain of the momentum filter: ELR = lr · factor (Appendix E).

        Heavy ball with dampening d: (1 − d)/(1 − m) (the paper's η/(1 − m) for d = 0);
        Nesterov (d = 0): g + m·g/(1 − m) = g/(1 − m) as well; Adam's bias-corrected EMA: 1.
        """
        if kind in ("adam", "adamw"):
            return 1.0
        if self.momentum == 0.0:
            return 1.0
        return (1.0 - self.dampening) / (1.0 - self.momentum)


@dataclass
class OptimizerSpec:
    """The optimiser the user is about to run, as the simulators need it."""

    kind: str  # "sgd" | "adam" | "adamw"
    groups: list[GroupSpec]
    name: str = "SGD"
    warnings: list[str] = field(default_factory=list)
    params: list[list[torch.nn.Parameter]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def sgd(cls, lr: float | list[float], momentum: float = 0.0, dampening: float = 0.0,
            nesterov: bool = False, weight_decay: float = 0.0) -> OptimizerSpec:
        """A spec without an optimiser (one group per lr)."""
        lrs = [lr] if np.isscalar(lr) else list(lr)
        return cls("sgd", [GroupSpec(float(x), momentum, dampening, nesterov, weight_decay) for x in lrs])

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> OptimizerSpec:
        """Read lrs, momentum, dampening, Nesterov, weight decay and param groups.

        Parameters that do not require grad are dropped from the groups (PyTorch never
        updates them). Unknown optimisers warn and are treated as SGD with their lr.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        name = type(optimizer).__name__
        msgs: list[str] = []
        if name in _SGD_LIKE:
            kind = "sgd"
        elif name in _ADAM_LIKE:
            kind = _ADAM_LIKE[name]
            if name not in ("Adam", "AdamW"):
                msgs.append(f"{name} is approximated as Adam.")
            msgs.append(
                f"{name}: Adam-type optimisers are approximated (diagonal preconditioner from "
                "gradients at w0 folded into the kernel); expect larger errors than for SGD."
            )
        else:
            kind = "sgd"
            msgs.append(f"unknown optimiser {name}: simulated as SGD with its learning rate and momentum.")
        groups, params = [], []
        for i, g in enumerate(optimizer.param_groups):
            if g.get("maximize", False):
                raise ValueError(f"param group {i} has maximize=True; training-time prediction assumes minimisation")
            if "lr" not in g:
                raise ValueError(f"param group {i} has no 'lr'")
            lr = g["lr"]
            lr = float(lr.item()) if torch.is_tensor(lr) else float(lr)
            ps = [p for p in g["params"] if p.requires_grad]
            betas = tuple(float(b) for b in g.get("betas", (0.9, 0.999)))
            momentum = float(g.get("momentum", 0.0) or 0.0)
            dampening = float(g.get("dampening", 0.0) or 0.0)
            wd = float(g.get("weight_decay", 0.0) or 0.0)
            decoupled = kind == "adamw" or bool(g.get("decoupled_weight_decay", False))
            if kind in ("adam", "adamw"):
                momentum, dampening = betas[0], betas[0]
                if g.get("amsgrad", False):
                    msgs.append("amsgrad is ignored by the Adam approximation.")
                if wd and not decoupled:
                    msgs.append(
                        "Adam with coupled weight decay (L2) is simulated as decoupled weight decay "
                        "(AdamW); prefer AdamW."
                    )
                    decoupled = True
            groups.append(
                GroupSpec(lr=lr, momentum=momentum, dampening=dampening, nesterov=bool(g.get("nesterov", False)),
                          weight_decay=wd, decoupled_weight_decay=decoupled, betas=betas,
                          eps=float(g.get("eps", 1e-8)), num_params=sum(p.numel() for p in ps))
            )
            params.append(ps)
        if not any(params):
            raise ValueError("the optimiser has no trainable parameters (all have requires_grad=False)")
        spec = cls(kind, groups, name=name, warnings=msgs, params=params)
        for m in msgs:
            warnings.warn(m, stacklevel=2)
        return spec

    # ------------------------------------------------------------------ helpers
    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def lrs(self) -> np.ndarray:
        return np.array([g.lr for g in self.groups], dtype=float)

    @property
    def has_weight_decay(self) -> bool:
        return any(g.weight_decay for g in self.groups)

    @property
    def has_momentum(self) -> bool:
        return any(g.momentum for g in self.groups)

    def constant_schedule(self, steps: int) -> np.ndarray:
        """lr array ``(steps, num_groups)`` without a scheduler."""
        return np.tile(self.lrs, (steps, 1))

    def schedule(self, lr_schedule: np.ndarray | Sequence | None = None, steps: int | None = None,
                 *, steps_name: str = "steps") -> np.ndarray:
        """Validated per-step, per-group lrs ``(T, num_groups)``.

        ``None``: the constant lrs for ``steps`` steps. A ``(T,)`` schedule scales every group in
        proportion to its own lr. With ``steps``, the schedule must cover them and is cut to them.
        """
        if lr_schedule is None:
            if steps is None:
                raise ValueError("pass an lr_schedule or the number of steps")
            return self.constant_schedule(steps)
        lrs = np.asarray(lr_schedule, dtype=np.float64)
        if lrs.ndim == 1:
            lrs = lrs[:, None] * (self.lrs / self.lrs[0] if self.lrs[0] else np.ones(self.num_groups))[None, :]
        if lrs.ndim != 2 or lrs.shape[1] != self.num_groups:
            raise ValueError(f"lr_schedule must have shape (steps, {self.num_groups}), got {lrs.shape}")
        if lrs.shape[0] < 1:
            raise ValueError("lr_schedule is empty: steps must be >= 1")
        if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
            raise ValueError("learning rates must be finite and >= 0")
        if steps is not None:
            if lrs.shape[0] < steps:
                raise ValueError(f"lr_schedule has {lrs.shape[0]} steps, fewer than {steps_name}={steps}")
            lrs = lrs[:steps]
        return lrs

    def replace(self, **changes: Any) -> OptimizerSpec:
        """A what-if copy: ``spec.replace(lr=0.1, momentum=0.9)`` changes every group.

        ``lr`` may also be a list (one per group). Parameters are shared, not copied.
        """
        lr = changes.pop("lr", None)
        kind = changes.pop("kind", self.kind)
        groups = []
        for i, g in enumerate(self.groups):
            new = dataclasses.replace(g, **changes)
            if lr is not None:
                new.lr = float(lr[i] if not np.isscalar(lr) else lr)
            groups.append(new)
        return OptimizerSpec(kind, groups, name=self.name, warnings=list(self.warnings), params=self.params)
