"""The kernel subset split across processes: which samples each one computes, and the gather.

Under data parallelism (``torch.distributed``, e.g. Lightning's DDP strategies) every process holds
the whole model, so the O(N·C) forward and backward passes of the empirical NTK split by samples:
process r of W computes the per-sample factors (or Jacobian rows, or random features) of its
contiguous shard ``[N·r/W, N·(r+1)/W)`` only, and the factors are all-gathered. The Gram is
symmetric, so the contraction splits its upper triangle: process r contracts the block
Θ[a_r:a_{r+1}, a_r:] (:func:`triangle_bounds`: edges that give every process about the same
m_r·(N − a_r) products, ≈ 0.38 of the whole Gram each at W = 2, → 1/(2W) for many processes),
the blocks are all-gathered and the lower triangle is filled by their transposes
(:meth:`Sharding.gather_upper`). Every process ends with the same Gram, equal to a one-process
Gram on the same samples up to float rounding (the same dot products, blocked differently).

A :class:`Sharding` is the whole interface: the rank, the world size, and an ``all_gather`` that
returns one equal-shaped tensor per process in rank order. It is pure torch: build it from a
``torch.distributed`` process group (:meth:`Sharding.from_process_group`) or from any framework's
gather (the Lightning callback passes ``trainer.strategy.all_gather``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_ttp.kernel.batch import slice_batch

__all__ = ["Sharding", "map_rows", "shard_bounds", "triangle_bounds"]

#: shards smaller than this are not worth a collective: below ``MIN_SHARD`` samples per process
#: every process computes the whole kernel (identical inputs, the same result)
MIN_SHARD = 2

AllGather = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``rank``'s contiguous shard of ``n`` samples (sizes differ by ≤ 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def triangle_bounds(n: int, world_size: int) -> list[int]:
    """Edges ``0 = a_0 < a_1 < … < a_W = n`` of the upper triangle's row blocks Θ[a_r:a_{r+1}, a_r:]
    with areas m_r·(n − a_r) (m_r = a_{r+1} − a_r) as equal as whole rows allow; every block holds
    at least one row (``n ≥ world_size``). Found by bisection on the common area A: the first W − 1
    blocks take ⌈A/(n − a_r)⌉ rows each, the last one the rest."""
    if not 1 <= world_size <= n:
        raise ValueError(f"need 1 <= world_size <= n, got world_size={world_size}, n={n}")

    def edges(area: float) -> list[int]:
        out = [0]
        for r in range(world_size - 1):
            left = n - out[-1]
            out.append(out[-1] + min(max(1, math.ceil(area / left)), left - (world_size - 1 - r)))
        return out + [n]

    def largest(e: list[int]) -> int:
        return max((e[r + 1] - e[r]) * (n - e[r]) for r in range(world_size))

    lo, hi, best = 0.0, float(n * n), edges(n * n / world_size)
    for _ in range(64):
        mid = (lo + hi) / 2
        e = edges(mid)
        if largest(e) < largest(best):
            best = e
        last = (n - e[-2]) ** 2
        lo, hi = (mid, hi) if last > mid else (lo, mid)
    return best


@dataclass(frozen=True)
class Sharding:
    """How the kernel's samples are split across ``world_size`` processes.

    Attributes:
        rank: this process's index in ``[0, world_size)``.
        world_size: the number of processes; every one of them must make the same calls in the
            same order (they are collectives).
        all_gather: ``all_gather(t)`` → the tensors of every process (equal shapes and dtypes), as
            a ``(world_size, *t.shape)`` tensor or a sequence in rank order.
        device: the device the collectives run on (NCCL: the process's CUDA device; gloo: the CPU);
            ``None``: each tensor's own.
    """

    rank: int
    world_size: int
    all_gather: AllGather
    device: torch.device | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank!r}, world_size={self.world_size!r}")

    @classmethod
    def from_process_group(cls, group: Any = None, device: torch.device | str | None = None) -> Sharding:
        """A sharding over a ``torch.distributed`` process group (default: the world). ``device``:
        where the collectives run (default: the current CUDA device under NCCL, else the CPU)."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"

        def gather(t: torch.Tensor) -> list[torch.Tensor]:
            out = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(out, t.contiguous(), group=group)
            return out

        return cls(rank, world, gather, device)

    def active(self, n: int) -> bool:
        """Whether ``n`` samples are split at all (at least ``MIN_SHARD`` per process)."""
        return self.world_size > 1 and n >= MIN_SHARD * self.world_size

    def bounds(self, n: int) -> tuple[int, int]:
        """This process's ``[start, stop)`` of ``n`` samples (the whole range when not :meth:`active`)."""
        return shard_bounds(n, self.world_size, self.rank) if self.active(n) else (0, n)

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """The ``(n, ...)`` tensor whose shard rows each process holds as ``part`` (its bounds'
        rows, along dim 0), on ``part``'s device and dtype. Shards are padded to equal size for the
        collective (bool tensors travel as uint8)."""
        if not self.active(n):
            return part
        sizes = [stop - start for start, stop in (shard_bounds(n, self.world_size, r) for r in range(self.world_size))]
        if part.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {part.shape[0]} rows, its shard has {sizes[self.rank]}")
        wire = part.to(torch.uint8) if part.dtype == torch.bool else part
        device = part.device if self.device is None else torch.device(self.device)
        pieces = self._gather_padded(wire, max(sizes), device)
        full = torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])
        return full.to(device=part.device, dtype=part.dtype)

    def _gather_padded(self, part: torch.Tensor, rows: int, device: torch.device) -> list[torch.Tensor]:
        """Every process's ``part``, zero-padded along dim 0 to ``rows`` for the collective, in rank
        order, on ``device``."""
        padded = part.new_zeros((rows, *part.shape[1:]), device=device)
        padded[: part.shape[0]] = part
        gathered = self.all_gather(padded)
        pieces = list(gathered.unbind(0) if isinstance(gathered, torch.Tensor) else gathered)
        if len(pieces) != self.world_size:
            raise RuntimeError(f"all_gather returned {len(pieces)} tensors for {self.world_size} processes")
        return pieces

    def contraction_rows(self, n: int) -> tuple[int, int]:
        """This process's ``[a_r, a_{r+1})``: the rows of the upper-triangle block Θ[a_r:a_{r+1}, a_r:]
        it contracts (:func:`triangle_bounds`; all rows when not :meth:`active`)."""
        if not self.active(n):
            return 0, n
        edges = triangle_bounds(n, self.world_size)
        return edges[self.rank], edges[self.rank + 1]

    def gather_upper(self, block: torch.Tensor, n: int, unit: int = 1) -> torch.Tensor:
        """The symmetric ``(..., n·unit, n·unit)`` matrix whose upper-triangle blocks each process
        holds: ``block`` (..., m·unit, (n − a)·unit) = Θ[a:a+m, a:] for its :meth:`contraction_rows`
        ``[a, a + m)``, ``unit`` rows per sample (C for a full kernel). Below the diagonal blocks the
        matrix is the transpose of what is above, exactly."""
        if not self.active(n):
            return block
        edges = [e * unit for e in triangle_bounds(n, self.world_size)]
        size = n * unit
        shapes = [(edges[r + 1] - edges[r], size - edges[r]) for r in range(self.world_size)]
        lead = block.shape[:-2]
        if tuple(block.shape[-2:]) != shapes[self.rank]:
            raise ValueError(f"rank {self.rank} holds a {tuple(block.shape[-2:])} block, its rows "
                             f"need {shapes[self.rank]}")
        device = block.device if self.device is None else torch.device(self.device)
        groups = math.prod(lead)
        pieces = self._gather_padded(block.reshape(-1), groups * max(h * w for h, w in shapes), device)
        out = block.new_empty((groups, size, size), device=device)
        for (lo, hi), (h, w), piece in zip(zip(edges[:-1], edges[1:]), shapes, pieces, strict=True):
            part = piece[: groups * h * w].view(groups, h, w)
            out[:, lo:hi, lo:] = part
            out[:, hi:, lo:hi] = part[:, :, h:].transpose(1, 2)
        return out.view(*lead, size, size).to(block.device)

    def rank_zero(self, flag: bool) -> bool:
        """Rank zero's ``flag`` on every process (a collective): a branch that leads into
        collectives must be taken by all processes alike."""
        if self.world_size == 1:
            return bool(flag)
        device = "cpu" if self.device is None else self.device
        gathered = self.all_gather(torch.tensor([int(bool(flag))], device=device))
        first = gathered[0] if not isinstance(gathered, torch.Tensor) else gathered.reshape(self.world_size, -1)[0]
        return bool(first.reshape(-1)[0].item())

    def map_rows(self, fn: Callable[[Any], list[torch.Tensor | None]], inputs: Any,
                 n: int) -> list[torch.Tensor | None]:
        """``fn(inputs)``, a list of ``(n, ...)`` tensors (or ``None``) with one row per sample computed
        independently of the others, evaluated on this process's shard of ``inputs`` and gathered."""
        if not self.active(n):
            return fn(inputs)
        start, stop = self.bounds(n)
        return [None if part is None else self.gather_rows(part, n) for part in fn(slice_batch(inputs, start, stop))]


def map_rows(sharding: Sharding | None, fn: Callable[[Any], list[torch.Tensor | None]], inputs: Any,
             n: int) -> list[torch.Tensor | None]:
    """:meth:`Sharding.map_rows`, or ``fn(inputs)`` without a sharding."""
    return fn(inputs) if sharding is None else sharding.map_rows(fn, inputs, n)
