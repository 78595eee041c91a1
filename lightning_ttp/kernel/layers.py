"""Fast paths: per-sample gradients of common layers from their inputs and output cotangents.

For a layer y = layer(x; w) the per-sample gradient of output c of sample i is
g_ic = Σ_p (∂y_ip/∂w)ᵀ δ_icp with δ_icp = ∂f_c(x_i)/∂y_ip. A forward hook keeps what the
layer saw (its input, the unfolded patches, the token ids or the normalised input) and
the output tensor; one batched backward per output c then gives δ for every layer at
once. Each adapter turns (input factor, δ) into :mod:`~lightning_ttp.kernel.terms`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_ttp.kernel.terms import ConvTerm, DenseTerm, IndexTerm, OuterTerm, Term, _patches

#: ``fn(delta, out)``: writes the per-sample gradients (n, k) of one output into ``out``.
GradientFn = Callable[[torch.Tensor, torch.Tensor], None]


class LayerAdapter:
    """A module whose ``weight``/``bias`` gradients we compute from hooks."""

    roles: tuple[str, ...] = ("weight", "bias")
    #: the term is only ever kept factored (never formed output by output with :meth:`gradient_fn`)
    factored_only = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.factor: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.calls = 0

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return True

    def parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for role in self.roles:
            p = getattr(self.module, role, None)
            if isinstance(p, nn.Parameter):
                out[role] = p
        return out

    def record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.factor = self.input_factor(x.detach())
        self.output = y
        self.calls += 1

    def input_factor(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stored_numel(self) -> int:
        """Elements of the recorded input factor as the exact Gram will hold it."""
        assert self.factor is not None
        return self.factor.numel()

    def delta_view(self, grad: torch.Tensor) -> torch.Tensor:
        """The output cotangent of one output c as (n, P, d_out)."""
        raise NotImplementedError

    def stacked_deltas(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The output cotangents of all C outputs (each shaped like the output) as (n, C, P, d_out)."""
        return torch.stack([self.delta_view(g) for g in grads], dim=1)

    def term(self, deltas: torch.Tensor, roles: list[str], scale: torch.Tensor | None = None) -> Term:
        """The term of the parameters named in ``roles`` (one group), deltas (n, C, P, d_out).

        ``scale`` (see :meth:`scale_of`) multiplies every per-sample gradient elementwise.
        """
        raise NotImplementedError

    def gradient_fn(self, roles: list[str], scale: torch.Tensor | None = None) -> GradientFn:
        """``fn(δ, out)``: δ (n, P, d_out) of one output → the per-sample gradients of ``roles``, times
        ``scale``, written into ``out`` (n, k), a contiguous tensor.

        Used where the gradients are materialised anyway: they are formed output by output, right
        after each backward pass, so the cotangents of all C outputs are never held together.
        """
        raise NotImplementedError

    def outer_dims(self, roles: list[str]) -> tuple[int, int, int] | None:
        """(positions P, d_in, d_out) when the term is g = Σ_p δ_p ⊗ a_p (ghost or materialised), else None."""
        return None

    def scale_of(self, roles: list[str], scales: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The per-parameter scales (by parameter id) of ``roles`` in the layout of the term's gradient rows."""
        params = self.parameters()
        if not any(id(params[role]) in scales for role in roles):
            return None
        parts = [scales.get(id(params[role]), torch.ones_like(params[role])) for role in roles]
        return torch.cat([part.detach().reshape(-1) for part in parts])

    def summed_gradients(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_i g_i for one output, delta (n, P, d_out); checks the fast path against autograd."""
        raise NotImplementedError


class _AffineAdapter(LayerAdapter):
    """y_p = W a_p + b at every position p (Linear on any leading shape; Conv as unfolded patches)."""

    def _inputs(self, roles: list[str]) -> torch.Tensor:
        """a (n, P, d_in), with the constant input 1 of the bias appended when the bias is in ``roles``."""
        a = self.factor
        assert a is not None
        if "bias" not in roles:
            return a
        out = a.new_empty(a.shape[:-1] + (a.shape[-1] + 1,))
        out[..., :-1] = a
        out[..., -1] = 1
        return out

    def scale_of(self, roles: list[str], scales: dict[int, torch.Tensor]) -> torch.Tensor | None:
        flat = super().scale_of(roles, scales)
        if flat is None or "weight" not in roles:
            return flat
        d_out = self.module.weight.shape[0]
        weight = flat[: self.module.weight.numel()].reshape(d_out, -1)
        if roles == ["weight"]:
            return weight
        return torch.cat([weight, flat[self.module.weight.numel() :, None]], dim=1)  # rows (output unit, input + 1)

    def outer_dims(self, roles: list[str]) -> tuple[int, int, int] | None:
        if "weight" not in roles:
            return None
        assert self.factor is not None
        return self.factor.shape[1], self.factor.shape[-1] + ("bias" in roles), self.module.weight.shape[0]

    def term(self, deltas: torch.Tensor, roles: list[str], scale: torch.Tensor | None = None) -> Term:
        if "weight" not in roles:
            return DenseTerm(_scaled(deltas.sum(dim=2), scale))
        return OuterTerm(self._inputs(roles), deltas, scale)

    def gradient_fn(self, roles: list[str], scale: torch.Tensor | None = None) -> GradientFn:
        if "weight" not in roles:
            return _bias_gradients(scale)
        a = self._inputs(roles)

        def gradients(delta: torch.Tensor, out: torch.Tensor) -> None:  # (n, d_out, P) @ (n, P, d_in) per sample
            torch.bmm(delta.transpose(1, 2), a, out=out.view(a.shape[0], -1, a.shape[-1]))
            _scale_(out, scale)

        return gradients

    def summed_gradients(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.factor
        assert a is not None
        params = self.parameters()
        out = {"weight": torch.einsum("npd,npa->da", delta, a).reshape(params["weight"].shape)}
        if "bias" in params:
            out["bias"] = delta.sum(dim=(0, 1))
        return out


class LinearAdapter(_AffineAdapter):
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def input_factor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise _Unsupported("unbatched input")
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def delta_view(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])


class ConvAdapter(_AffineAdapter):
    """Conv1d/Conv2d with groups=1 and zero padding: y = W · unfold(x) + b."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return (
            isinstance(module, (nn.Conv1d, nn.Conv2d))
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not (isinstance(module.padding, str) and module.padding != "valid")
        )

    def _geometry(self) -> tuple[tuple[int, ...], ...]:
        m = self.module
        padding = (0,) * len(m.kernel_size) if isinstance(m.padding, str) else tuple(m.padding)
        kernel, dilation, stride = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
        if isinstance(m, nn.Conv1d):  # as a Conv2d over an image of height 1
            return (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
        return kernel, dilation, padding, stride

    def input_factor(self, x: torch.Tensor) -> torch.Tensor:
        """The input as an image batch (n, C_in, H, W); patches are unfolded by :class:`ConvTerm`."""
        if isinstance(self.module, nn.Conv1d):
            if x.dim() != 3:
                raise _Unsupported("unbatched input")
            return x.unsqueeze(2)
        if x.dim() != 4:
            raise _Unsupported("unbatched input")
        return x

    def delta_view(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)

    def stacked_deltas(self, grads: list[torch.Tensor]) -> torch.Tensor:
        # stack the channel-first cotangents as they are and transpose the view: a transposed copy
        # of every δ would cost more than the products that read them (which take this layout)
        stacked = torch.stack(grads, dim=1)
        return stacked.reshape(stacked.shape[0], stacked.shape[1], stacked.shape[2], -1).transpose(2, 3)

    def stored_numel(self) -> int:
        assert self.factor is not None and self.output is not None
        positions = self.output[0, 0].numel()
        return self.factor.shape[0] * positions * self.module.weight[0].numel()

    def outer_dims(self, roles: list[str]) -> tuple[int, int, int] | None:
        if "weight" not in roles:
            return None
        assert self.output is not None
        weight = self.module.weight
        return self.output[0, 0].numel(), weight[0].numel() + ("bias" in roles), weight.shape[0]

    def _inputs(self, roles: list[str]) -> torch.Tensor:
        assert self.factor is not None
        return _patches(self.factor, self._geometry(), bias="bias" in roles)

    def term(self, deltas: torch.Tensor, roles: list[str], scale: torch.Tensor | None = None) -> Term:
        assert self.factor is not None
        if "weight" not in roles:
            return DenseTerm(_scaled(deltas.sum(dim=2), scale))
        return ConvTerm(self.factor, deltas, self._geometry(), bias=roles == ["weight", "bias"], scale=scale)

    def summed_gradients(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.factor is not None
        patches = _patches(self.factor, self._geometry())
        params = self.parameters()
        out = {"weight": torch.einsum("npd,npa->da", delta, patches).reshape(params["weight"].shape)}
        if "bias" in params:
            out["bias"] = delta.sum(dim=(0, 1))
        return out


class EmbeddingAdapter(LayerAdapter):
    roles = ("weight",)
    factored_only = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and module.max_norm is None and not module.sparse

    def input_factor(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def delta_view(self, grad: torch.Tensor) -> torch.Tensor:
        delta = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        pad = self.module.padding_idx
        if pad is not None:
            assert self.factor is not None
            delta = delta * (self.factor != pad).unsqueeze(-1).to(delta.dtype)
        return delta

    def term(self, deltas: torch.Tensor, roles: list[str], scale: torch.Tensor | None = None) -> Term:
        assert self.factor is not None
        if scale is not None:  # g[v] ⊙ s[v] = Σ_p [id_p = v] δ_p ⊙ s[id_p]: scale each position's cotangent
            deltas = deltas * scale.reshape(self.module.weight.shape)[self.factor].unsqueeze(1)
        return IndexTerm(self.factor, deltas, self.module.num_embeddings)

    def summed_gradients(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.factor is not None
        weight = self.module.weight
        grad = torch.zeros_like(weight).index_add_(0, self.factor.reshape(-1), delta.reshape(-1, weight.shape[1]))
        return {"weight": grad}


class _NormAdapter(LayerAdapter):
    """y = x̂ ⊙ w + b with x̂ the normalised input; g_w = Σ_p δ_p ⊙ x̂_p, g_b = Σ_p δ_p."""

    channel_last = False

    def delta_view(self, grad: torch.Tensor) -> torch.Tensor:
        return self._to_positions(grad)

    def _to_positions(self, t: torch.Tensor) -> torch.Tensor:
        """(n, P, channels) with channels the affine parameter's entries."""
        if self.channel_last:
            k = self.module.weight.numel() if self.module.weight is not None else self.module.bias.numel()
            return t.reshape(t.shape[0], -1, k)
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)

    def _features(self, deltas: torch.Tensor, role: str) -> torch.Tensor:
        if role == "bias":
            return deltas.sum(dim=2)
        assert self.factor is not None
        return torch.einsum("ncpk,npk->nck", deltas, self.factor)

    def term(self, deltas: torch.Tensor, roles: list[str], scale: torch.Tensor | None = None) -> Term:
        return DenseTerm(_scaled(torch.cat([self._features(deltas, role) for role in roles], dim=-1), scale))

    def gradient_fn(self, roles: list[str], scale: torch.Tensor | None = None) -> GradientFn:
        def gradients(delta: torch.Tensor, out: torch.Tensor) -> None:
            torch.cat([self._features(delta.unsqueeze(1), role)[:, 0] for role in roles], dim=-1, out=out)
            _scale_(out, scale)

        return gradients

    def summed_gradients(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        params = self.parameters()
        out = {}
        for role, p in params.items():
            out[role] = self._features(delta.unsqueeze(1), role).sum(dim=(0, 1)).reshape(p.shape)
        return out


class LayerNormAdapter(_NormAdapter):
    channel_last = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.LayerNorm) and module.elementwise_affine

    def input_factor(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return self._to_positions(F.layer_norm(x, m.normalized_shape, None, None, m.eps))


class GroupNormAdapter(_NormAdapter):
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.GroupNorm) and module.affine

    def input_factor(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return self._to_positions(F.group_norm(x, m.num_groups, None, None, m.eps))


class BatchNormAdapter(_NormAdapter):
    """Eval-mode BatchNorm: x̂ = (x − running_mean) / sqrt(running_var + eps)."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine

    def input_factor(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if m.running_mean is None or m.running_var is None:
            raise _Unsupported("no running statistics")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
        return self._to_positions(x_hat)


ADAPTERS: tuple[type[LayerAdapter], ...] = (
    LinearAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    LayerNormAdapter,
    GroupNormAdapter,
    BatchNormAdapter,
)


def _scaled(features: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return features if scale is None else features * scale


def _scale_(out: torch.Tensor, scale: torch.Tensor | None) -> None:
    if scale is not None:
        out.mul_(scale.reshape(-1))


def _bias_gradients(scale: torch.Tensor | None) -> GradientFn:
    def gradients(delta: torch.Tensor, out: torch.Tensor) -> None:
        torch.sum(delta, dim=1, out=out)
        _scale_(out, scale)

    return gradients


class _Unsupported(Exception):
    """This call of a layer is outside what its fast path handles; its parameters use the fallback."""


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The fast path for ``module`` (None: the generic fallback). A parametrised module (e.g.
    ``nn.utils.parametrizations.spectral_norm``) computes its weight from other tensors, so its
    weight is no parameter of its own: the fallback differentiates through the parametrisation."""
    if parametrize.is_parametrized(module):
        return None
    for cls in ADAPTERS:
        if cls.supports(module):
            return cls(module)
    return None


class Capture:
    """Forward hooks on the adapters' modules for the duration of a ``with`` block.

    A call whose input or output does not lead with the ``num_samples`` dimension (a
    sequence-first tensor, a reshaped batch) is marked failed: that layer takes the fallback.

    The hook returns a clone of the output so that an in-place operation after the layer
    (``ReLU(inplace=True)``) cannot overwrite the tensor whose cotangent we ask for.
    """

    def __init__(self, adapters: list[LayerAdapter], num_samples: int):
        self.adapters = adapters
        self.num_samples = num_samples
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.failed: set[int] = set()

    def __enter__(self) -> Capture:
        for index, adapter in enumerate(self.adapters):
            adapter.calls = 0
            self.handles.append(adapter.module.register_forward_hook(self._hook(index, adapter)))
        return self

    def _hook(self, index: int, adapter: LayerAdapter):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if (
                not args
                or not isinstance(args[0], torch.Tensor)
                or not isinstance(output, torch.Tensor)
                or args[0].dim() == 0
                or args[0].shape[0] != self.num_samples  # e.g. sequence-first (L, N, d) tensors
                or output.shape[0] != self.num_samples
            ):
                self.failed.add(index)
                return None
            try:
                adapter.record(args[0], output)
            except _Unsupported:
                self.failed.add(index)
                return None
            return output.clone()

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
