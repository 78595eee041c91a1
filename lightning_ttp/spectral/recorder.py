"""Recording hidden representations during a model's own forward passes (pure torch).

:class:`ActivationRecorder` finds the layers whose outputs the DAI scores watch and records
their outputs on the first ``num_samples`` samples that go through the model while it is
attached. Nothing is run on its own: it listens to the forward passes the caller makes
(Lightning's validation loop, or a forward pass over a fixed subset).

Finding the representation (``layers=None``). During the first recorded batch every
submodule is hooked, and the modules that *actually run* are listed in the order they finish
(modules registered but never called, e.g. an auxiliary head, are not seen). From that trace:

* the **head** is the last ``nn.Linear`` to run; its *input* is the penultimate
  representation (what the classifier sees), recorded with a forward pre-hook;
* every earlier ``nn.Linear`` directly followed by an activation module contributes that
  activation's output (post-activation hidden layers, as in the paper's MLPs);
* convolutional feature maps are grouped by spatial size (larger than 1 x 1); the last output
  of each of the last ``conv_stages`` sizes is recorded, globally average-pooled to (samples, channels)
  (the paper's appendix A.1 suggests pooling for CNNs);
* duplicates (the same values reached twice, e.g. an MLP's last ReLU is also the head's
  input) are kept once.

Reducing a module's output to a (samples, features) matrix. The output's first tensor is
used (an LSTM's ``(output, (h, c))`` gives ``output``). The sample axis is the axis whose
length is the batch's number of samples; when several are (sequence length = batch size),
the module's (or its first submodule's) ``batch_first`` attribute decides, else axis 0 — so
``nn.TransformerEncoder(batch_first=False)`` outputs (T, B, d) give B rows. Remaining
axes are averaged: spatial axes of channels-first maps (after a convolution or pooling), or
the middle (sequence) axes of features-last tensors (after a Linear, RNN, attention or
normalisation layer). The choice is made once, on the first batch, and kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = ["ActivationRecorder", "RecordedLayer"]

_ACTIVATIONS = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.PReLU, nn.Hardtanh, nn.Hardswish, nn.Softsign,
)
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_FEATURES_LAST = (
    nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention, nn.LayerNorm,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
)


@dataclass(frozen=True)
class RecordedLayer:
    """One recorded representation: ``name`` (as in ``named_modules()``), ``where`` (``"output"``,
    or ``"input"`` for the head's input), ``sample_axis``, ``channels_first`` (how the other axes
    are averaged) and ``units`` (columns of the recorded matrix)."""

    name: str
    where: str
    sample_axis: int
    channels_first: bool
    units: int

    @property
    def label(self) -> str:
        return self.name if self.where == "output" else f"{self.name} (input)"


def _first_tensor(value: Any) -> torch.Tensor | None:
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return None


def _batch_first(module: nn.Module) -> bool | None:
    for m in module.modules():
        flag = getattr(m, "batch_first", None)
        if isinstance(flag, bool):
            return flag
    return None


def _sample_axis(t: torch.Tensor, batch: int | None, module: nn.Module) -> int | None:
    if t.dim() == 0:
        return None
    if batch is None:
        return 0
    axes = [a for a in range(t.dim()) if t.shape[a] == batch]
    if not axes:
        return None
    if len(axes) > 1 and 1 in axes and _batch_first(module) is False:
        return 1
    return axes[0]


def _reduce(t: torch.Tensor, axis: int, channels_first: bool, rows: int) -> torch.Tensor:
    """(…, B, …) -> (rows, features) float32 copy: sample axis first, the other axes averaged."""
    t = t.detach().movedim(axis, 0)[:rows]
    if t.dim() == 1:
        t = t.unsqueeze(1)
    elif t.dim() > 2:
        t = t.flatten(2).mean(2) if channels_first else t.reshape(t.shape[0], -1, t.shape[-1]).mean(1)
    return t.to(torch.float32, copy=True)


class ActivationRecorder:
    """Hooks that record a model's hidden representations on its next ``num_samples`` samples.

    Usage: :meth:`attach` the model, call :meth:`start_batch` before each forward pass whose
    samples should count (with the batch's number of samples), then :meth:`matrices` gives one
    (rows, units) float32 matrix per layer of :attr:`layers`; :meth:`detach` removes every hook.
    The layers are chosen on the first recorded batch and kept for later rounds
    (:meth:`reset` forgets them).

    Args:
        num_samples: rows to record per layer and round.
        layers: module names to record (their outputs); ``None`` finds them (module docstring).
        conv_stages: how many of the last spatial sizes of a convolutional network to record.
    """

    def __init__(self, num_samples: int, layers: Sequence[str] | None = None, conv_stages: int = 2) -> None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.requested = None if layers is None else list(layers)
        self.conv_stages = int(conv_stages)
        self.layers: list[RecordedLayer] | None = None
        self.missing: list[str] = []
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._buffers: list[list[torch.Tensor]] = []
        self._trace: list[tuple[str, nn.Module, str, torch.Tensor, int, bool, tuple[int, ...]]] = []
        self._active = False
        self._batch: int | None = None
        self._rows = 0
        self._seen: set[tuple[str, str]] = set()
        self._layout_cf = False

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget the chosen layers (a new model or a new fit)."""
        self.detach()
        self.layers = None
        self.missing = []

    def attach(self, model: nn.Module) -> None:
        """Register the hooks for one round (all modules if the layers are still to be found)."""
        self.detach()
        self._model = model
        self._buffers = [[] for _ in self.layers or []]
        self._rows = 0
        named = dict(model.named_modules())
        if self.layers is None:
            for name, mod in named.items():
                if not name:
                    continue
                self._handles.append(mod.register_forward_hook(self._discovery_hook(name)))
                if isinstance(mod, nn.Linear):
                    self._handles.append(mod.register_forward_pre_hook(self._discovery_pre_hook(name)))
            return
        for i, layer in enumerate(self.layers):
            mod = named[layer.name]
            if layer.where == "input":
                self._handles.append(mod.register_forward_pre_hook(self._pre_hook(i)))
            else:
                self._handles.append(mod.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = False
        self._trace = []

    @property
    def full(self) -> bool:
        return self._rows >= self.num_samples

    def start_batch(self, batch_size: int | None, record: bool = True) -> None:
        """The next forward pass's samples count (``record``) and how many there are."""
        self._active = record and not self.full and bool(self._handles)
        self._batch = batch_size
        self._seen = set()
        self._layout_cf = False

    def end_batch(self) -> None:
        """After a recorded forward pass: choose the layers (first batch) and count its rows."""
        if not self._active:
            return
        self._active = False
        if self.layers is None:
            self._choose()
        if self.layers is not None and self._buffers and self._buffers[0]:
            self._rows = min(self.num_samples, sum(int(b.shape[0]) for b in self._buffers[0]))

    def matrices(self) -> list[torch.Tensor]:
        """One (rows, units) float32 matrix per recorded layer (rows <= num_samples)."""
        out = []
        for i, layer in enumerate(self.layers or []):
            parts = self._buffers[i] if i < len(self._buffers) else []
            mat = torch.cat(parts)[: self.num_samples] if parts else torch.empty(0, layer.units)
            out.append(mat)
        return out

    # ------------------------------------------------------------------ hooks
    def _remaining(self) -> int:
        return self.num_samples - self._rows

    def _store(self, i: int, t: torch.Tensor | None, layer: RecordedLayer) -> None:
        if not self._active or t is None or (layer.name, layer.where) in self._seen:
            return
        self._seen.add((layer.name, layer.where))
        if t.dim() <= layer.sample_axis:
            return
        self._buffers[i].append(_reduce(t, layer.sample_axis, layer.channels_first, self._remaining()))

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._store(i, _first_tensor(output), self.layers[i])  # type: ignore[index]

        return hook

    def _pre_hook(self, i: int):
        def hook(module: nn.Module, inputs: Any) -> None:
            self._store(i, _first_tensor(inputs), self.layers[i])  # type: ignore[index]

        return hook

    def _record_trace(self, name: str, module: nn.Module, where: str, t: torch.Tensor | None, cf: bool) -> None:
        if not self._active or t is None or (name, where) in self._seen:
            return
        self._seen.add((name, where))
        axis = _sample_axis(t, self._batch, module)
        if axis is None:
            return
        spatial = tuple(t.shape[axis + 2 :]) if cf and t.dim() >= 3 else ()
        red = _reduce(t, axis, cf and t.dim() >= 3, self._remaining())
        self._trace.append((name, module, where, red, axis, cf and t.dim() >= 3, spatial))

    def _discovery_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(module, _CHANNELS_FIRST):
                self._layout_cf = True
            elif isinstance(module, _FEATURES_LAST):
                self._layout_cf = False
            self._record_trace(name, module, "output", _first_tensor(output), self._layout_cf)

        return hook

    def _discovery_pre_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any) -> None:
            self._record_trace(name, module, "input", _first_tensor(inputs), False)

        return hook

    # ------------------------------------------------------------------ choosing the layers
    def _choose(self) -> None:
        trace, self._trace = self._trace, []
        outputs = [e for e in trace if e[2] == "output"]
        if self.requested is not None:
            by_name = {e[0]: e for e in outputs}
            self.missing = [n for n in self.requested if n not in by_name]
            chosen = [by_name[n] for n in self.requested if n in by_name]
        else:
            chosen = self._default_choice(trace, outputs)
        kept: list[tuple] = []
        for e in chosen:
            if not any(k[3].shape == e[3].shape and torch.equal(k[3], e[3]) for k in kept):
                kept.append(e)
        if self.requested is None:  # in the order the model computes them
            order = {id(e): i for i, e in enumerate(trace)}
            kept.sort(key=lambda e: order[id(e)])
        self.layers = [RecordedLayer(e[0], e[2], e[4], e[5], int(e[3].shape[1])) for e in kept]
        self._buffers = [[e[3]] for e in kept]
        # from now on only the chosen modules are hooked
        model = self._model
        for h in self._handles:
            h.remove()
        self._handles = []
        if model is not None:
            rows, self._rows = self._rows, 0
            self.attach(model)
            self._buffers = [[e[3]] for e in kept]
            self._rows = rows

    def _default_choice(self, trace: list, outputs: list) -> list:
        linear_in = [e for e in trace if e[2] == "input" and isinstance(e[1], nn.Linear)]
        head = linear_in[-1] if linear_in else None
        chosen = []
        if head is not None:
            chosen.append(head)
            head_pos = trace.index(head)
            for i, e in enumerate(outputs[:-1]):
                if isinstance(e[1], nn.Linear) and trace.index(e) < head_pos:
                    nxt = outputs[i + 1]
                    if isinstance(nxt[1], _ACTIVATIONS):
                        chosen.append(nxt)
        stages: list[tuple[tuple[int, ...], tuple]] = []
        for e in outputs:
            if e[5] and math.prod(e[6]) > 1:  # a 1 x 1 map is a vector, not a stage
                if stages and stages[-1][0] == e[6]:
                    stages[-1] = (e[6], e)
                else:
                    stages.append((e[6], e))
        chosen += [e for _, e in stages[-self.conv_stages :]] if self.conv_stages > 0 else []
        if not chosen and outputs:  # no Linear head, no conv maps: the last module that ran
            chosen.append(outputs[-1])
        # the head's input (chosen first) wins over an identical post-activation output
        return chosen
