"""The kernel split across processes (``torch.distributed`` on gloo, 2 CPU processes) equals the
one-process kernel, and each process ran the passes of its own shard only.

The Lightning end of it (``ddp_spawn``, the callback) is in ``tests/test_callback_predictor.py``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_ttp.kernel import Sharding, empirical_ntk
from lightning_ttp.kernel.shard import shard_bounds, triangle_bounds
from lightning_ttp.pipeline.estimate import estimate_kernel
from tests.conftest import GLOO_EXIT_ABORT

N = 13  # odd: the shards differ in size (6 and 7)
RTOL = 1e-6


class Scaled(nn.Module):
    """A custom layer: its parameter goes through the torch.func fallback."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.s


def _conv_model(fallback: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(64),
                         Scaled(64) if fallback else nn.Identity(), nn.Linear(64, 3))


def _bn_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _images() -> torch.Tensor:
    return torch.randn(N, 2, 6, 6, generator=torch.Generator().manual_seed(1))


def _vectors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def _kernels(sharding: Sharding | None) -> dict[str, torch.Tensor]:
    """Every kernel the engine and the estimate make, with or without a sharding."""
    model, x = _conv_model(), _images()
    out = {}
    for name, options in {"full": {}, "trace": {"kernel": "trace"}, "projected": {"projection_dim": 40},
                          "chunked": {"chunk_size": 2},
                          "scaled": {"parameter_scales": {p: torch.full_like(p, 0.7) for p in model.parameters()}}
                          }.items():
        ntk = empirical_ntk(model, x, sharding=sharding, **options)
        out[name], out[name + ".outputs"] = ntk.gram, ntk.outputs
    bn, (v, y) = _bn_model(), _vectors()
    bn.train()
    for name, options in {"estimate.wd": {"batch_statistics": False},
                          "estimate.bn": {"batch_statistics": True}}.items():
        opt = torch.optim.SGD(bn.parameters(), lr=0.1, weight_decay=1e-3)
        ke = estimate_kernel(bn, v, y, optimizer=opt, kernel="full", sharding=sharding, **options)
        out[name] = torch.stack(ke.grams)
        out[name + ".jvp_w0"] = torch.stack(ke.jvp_w0)
        out[name + ".outputs"] = ke.outputs
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen: list[int] = []  # samples through each pass's forward (the probe's two, then the shard's)
        original = nn.Conv2d.forward

        def counting(self, x):
            seen.append(int(x.shape[0]))
            return original(self, x)

        nn.Conv2d.forward = counting
        try:
            ntk = empirical_ntk(_conv_model(fallback=False), _images(), sharding=Sharding.from_process_group(),
                                chunk_size=4)
        finally:
            nn.Conv2d.forward = original
        results = _kernels(Sharding.from_process_group())
        torch.save({"kernels": results, "seen": seen, "shard": ntk.shard, "world_size": ntk.world_size},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@GLOO_EXIT_ABORT
def test_sharded_kernels_equal_the_one_process_kernels(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    reference = _kernels(None)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, got in enumerate(ranks):
        assert got["world_size"] == 2
        lo, hi = shard_bounds(N, 2, rank)
        assert got["shard"] == (lo, hi)
        # the passes saw this rank's shard only (in chunks of 4), after the two-sample probe
        assert got["seen"][0] == 2 and sum(got["seen"][1:]) == hi - lo, got["seen"]
        for name, ref in reference.items():
            err = float((got["kernels"][name] - ref).abs().max() / ref.abs().max())
            assert err <= RTOL, (rank, name, err)
    for name in reference:  # and every process holds the same kernel, bit for bit
        assert torch.equal(ranks[0]["kernels"][name], ranks[1]["kernels"][name]), name


def test_shard_bounds_cover_the_samples_once():
    for n in (1, 2, 7, 256):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_triangle_bounds_balance_the_upper_triangle():
    for n in (8, 13, 256, 1000):
        for world in (2, 3, 8):
            edges = triangle_bounds(n, world)
            assert edges[0] == 0 and edges[-1] == n and all(b > a for a, b in zip(edges, edges[1:]))
            areas = [(edges[r + 1] - edges[r]) * (n - edges[r]) for r in range(world)]
            assert sum(areas) >= n * (n + 1) // 2  # the blocks cover the upper triangle
            assert max(areas) - min(areas) <= 2 * n, (n, world, areas)  # a boundary row moves ≤ 2n products
    with pytest.raises(ValueError, match="world_size"):
        triangle_bounds(2, 3)


def test_gather_upper_assembles_the_symmetric_matrix():
    """Three processes' upper-triangle blocks (two groups, two rows per sample) give back the whole
    symmetric matrix on every process; the collective is faked in one process."""
    n, unit, world = 11, 2, 3
    g = torch.randn(2, n * unit, 5, generator=torch.Generator().manual_seed(0))
    full = g @ g.transpose(1, 2)
    full = full.triu() + full.triu(1).transpose(1, 2)  # exactly symmetric
    sent: dict[int, torch.Tensor] = {}

    def sharding(rank: int) -> Sharding:
        return Sharding(rank, world, lambda t: (sent.__setitem__(rank, t), [sent.get(r, t) for r in range(world)])[1])

    def block(rank: int) -> torch.Tensor:
        a, b = sharding(rank).contraction_rows(n)
        return full[:, a * unit : b * unit, a * unit :]

    for rank in range(world):  # every process posts its block first
        sharding(rank).gather_upper(block(rank), n, unit)
    for rank in range(world):
        got = sharding(rank).gather_upper(block(rank), n, unit)
        assert torch.equal(got, full), rank
    with pytest.raises(ValueError, match="block"):
        sharding(0).gather_upper(full, n, unit)


def test_one_process_sharding_changes_nothing():
    model, x = _conv_model(), _images()
    alone = Sharding(0, 1, lambda t: [t])
    assert torch.equal(empirical_ntk(model, x, sharding=alone).gram, empirical_ntk(model, x).gram)
    with pytest.raises(ValueError, match="rank"):
        Sharding(2, 2, lambda t: [t])
