"""Random projections generated from a seed on the fly (never stored as a D × D' matrix).

Every block of rows of the D × D' projection matrix R is drawn from its own generator,
seeded by ``(seed, term, block)``, so a block can be regenerated anywhere and the result
does not depend on how the work is chunked. Entries have variance 1/D', hence
E[R Rᵀ] = I and E[(G R)(G R)ᵀ] = G Gᵀ: the projected Gram is unbiased (Section 4 of
Zancato et al., 2020).

- ``gaussian``: R_ij ~ N(0, 1/D').
- ``sparse`` (Achlioptas, 2003): R_ij = sqrt(3/D') · {+1 w.p. 1/6, 0 w.p. 2/3, −1 w.p. 1/6}.
"""

from __future__ import annotations

import math

import torch

PROJECTIONS = ("gaussian", "sparse", "kronecker")


def _generator(seed: int, term: int, block: int) -> torch.Generator:
    mixed = (seed * 1_000_003 + term * 10_007 + block * 101 + 17) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def random_block(
    rows: int,
    dim: int,
    *,
    seed: int,
    term: int,
    block: int,
    kind: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Rows ``block`` of the projection matrix of ``term``: a (rows, dim) tensor, E[R Rᵀ] = I."""
    gen = _generator(seed, term, block)
    if kind == "gaussian":
        out = torch.randn(rows, dim, generator=gen, dtype=dtype)
        return out.mul_(1.0 / math.sqrt(dim)).to(device)
    if kind == "sparse":
        draws = torch.randint(0, 6, (rows, dim), generator=gen, dtype=torch.uint8)
        scale = math.sqrt(3.0 / dim)
        out = (draws == 0).to(dtype).mul_(scale) - (draws == 1).to(dtype).mul_(scale)
        return out.to(device)
    raise ValueError(f"unknown projection {kind!r}; choose one of 'gaussian', 'sparse'.")
