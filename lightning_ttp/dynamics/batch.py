"""One step's mini-batch of P simulated paths (:class:`Batch`), shared by the simulators and the losses.

Its own module so that ``losses`` (whose batch gradients take a :class:`Batch`) and ``discrete``
(which imports the losses) do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Batch"]


@dataclass(frozen=True)
class Batch:
    """One step's batch for P paths: the gradient weights w_t of the samples it holds.

    ``index is None``: dense weights (P, N). Otherwise ``index`` (P, K) are sample indices
    (repeats add up) and ``weight`` (P, K) their weights, w_{t,i} = Σ_{k: index_k = i} weight_k.
    """

    weight: torch.Tensor
    index: torch.Tensor | None = None
    _rows: dict = field(default_factory=dict, repr=False, compare=False)

    def gram_rows(self, c: int) -> torch.Tensor:
        """(P, K·C): the rows i·C + c of a sample-major (N·C)² Gram for the batch's samples i."""
        key = ("full", c)
        if key not in self._rows:
            p, k = self.index.shape
            self._rows[key] = (self.index[..., None] * c + torch.arange(c, device=self.index.device)).reshape(p, k * c)
        return self._rows[key]

    def trace_rows(self, c: int) -> torch.Tensor:
        """(P·C, K): the batch's samples once per (path, class), the bags of a trace-kernel product."""
        key = ("trace", c)
        if key not in self._rows:
            p, k = self.index.shape
            self._rows[key] = self.index[:, None, :].expand(p, c, k).reshape(p * c, k)
        return self._rows[key]

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device`` (itself when it is there already)."""
        if self.weight.device == torch.device(device):
            return self
        return Batch(self.weight.to(device), None if self.index is None else self.index.to(device))

    def dense(self, n: int) -> torch.Tensor:
        """The weights as (P, N)."""
        if self.index is None:
            return self.weight
        return torch.zeros(self.weight.shape[0], n, dtype=self.weight.dtype,
                           device=self.weight.device).scatter_add_(1, self.index, self.weight)

    def gradient(self, gsample: torch.Tensor) -> torch.Tensor:
        """The batch gradient w ⊙ G: (P, N, C) for dense weights, else its K rows (P, K, C)."""
        if self.index is None:
            return self.weight[..., None] * gsample
        return self.weight[..., None] * self.rows(gsample)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's rows (P, K, C) of a per-sample tensor x (P, N, C) (x itself when dense)."""
        if self.index is None:
            return x
        return torch.gather(x, 1, self.index[..., None].expand(-1, -1, x.shape[-1]))
