"""Kernel time per process against the number of processes the kernel subset is split across (#19).

Every world size W (``--worlds``, default 1 2) starts W fresh processes (``torch.distributed``:
gloo on the CPU, NCCL with ``--device cuda``, one GPU per process) that each time
:func:`lightning_ttp.kernel.empirical_ntk` with a :class:`lightning_ttp.kernel.Sharding` of the
world (median of ``--repeats`` calls after one warm-up; the slowest process's time counts), and
then make one whole prediction (:func:`lightning_ttp.api.predict_run`, look-ahead included) with
it. The Grams and the predicted loss curves are compared with the one-process ones (W = 1 is the
reference: the same code without a sharding)::

    python benchmarks/kernel_sharding.py                       # 1 and 2 processes on the CPU
    python benchmarks/kernel_sharding.py --worlds 1 2 4 8 --device cuda --n 1024   # 8 GPUs

The model is an MLP whose kernel dominates its prediction (C = 10 outputs, full kernel, N = 256:
the N·(1 + C) forward and backward passes and the (N·C)² contraction). Results in
``benchmarks/results/kernel_sharding.json``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import save  # noqa: E402
from lightning_ttp.api import predict_run  # noqa: E402
from lightning_ttp.kernel import Sharding, empirical_ntk  # noqa: E402
from lightning_ttp.pipeline.plan import plan_run  # noqa: E402


def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    sharding = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        sharding = Sharding.from_process_group(device=device)
    model = _model(args.width, args.depth).to(device)
    x, y = (t.to(device) for t in _data(args.n))
    seconds, timings = [], []
    for repeat in range(args.repeats + 1):
        if sharding is not None:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        ntk = empirical_ntk(model, x, sharding=sharding)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:  # the first call is a warm-up (the fast paths' probe, allocator)
            seconds.append(time.perf_counter() - tick)
            timings.append(ntk.timings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = plan_run((x, y), optimizer, args.steps, batch_size=32)
    tick = time.perf_counter()
    run = predict_run(model, (x, y), optimizer, plan, seed=0, sharding=sharding, budget=None)
    predict_seconds = time.perf_counter() - tick
    torch.save({"seconds": seconds, "timings": timings, "gram": ntk.gram.cpu(), "loss": run.prediction.loss,
                "predict_seconds": predict_seconds, "shard": ntk.shard},
               os.path.join(out, f"w{world}_r{rank}.pt"))
    if sharding is not None:
        dist.barrier()
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=256, help="kernel samples")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="planned steps of the whole prediction")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    args = parser.parse_args(argv)
    worlds = sorted(set(args.worlds) | {1})
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for world in worlds:
            mp.spawn(_worker, args=(world, _port(), args, out), nprocs=world)
            ranks = [torch.load(os.path.join(out, f"w{world}_r{r}.pt"), weights_only=False) for r in range(world)]
            rows[world] = {
                "per_rank_seconds": max(statistics.median(r["seconds"]) for r in ranks),
                "parts": {k: max(statistics.median(t[k] for t in r["timings"]) for r in ranks)
                          for k in ranks[0]["timings"][0]},
                "predict_seconds": max(r["predict_seconds"] for r in ranks),
                "gram": ranks[0]["gram"], "loss": ranks[0]["loss"],
                "same_on_every_rank": all(torch.equal(r["gram"], ranks[0]["gram"]) for r in ranks),
            }
    ref = rows[1]
    summary = {"config": vars(args), "worlds": {}}
    print(f"empirical NTK, MLP 64-{args.width}×{args.depth}-10, N = {args.n}, full kernel, {args.device}, "
          f"{args.threads} thread(s) per process (median of {args.repeats}; the slowest process)")
    print("| processes | kernel s per process | × one process | passes / contraction / gather s | "
          "whole prediction s | Gram rel. err | predicted loss rel. err |")
    print("|---|---|---|---|---|---|---|")
    for world, row in rows.items():
        gram_err = float((row["gram"] - ref["gram"]).abs().max() / ref["gram"].abs().max())
        loss_err = float(abs(row["loss"] / ref["loss"] - 1).max())
        ratio = row["per_rank_seconds"] / ref["per_rank_seconds"]
        parts = row["parts"]
        print(f"| {world} | {row['per_rank_seconds']:.3f} | {ratio:.2f} | {parts['passes']:.3f} / "
              f"{parts['contraction']:.3f} / {parts['gather']:.3f} | {row['predict_seconds']:.2f} | {gram_err:.1e} | "
              f"{loss_err:.1e} |")
        summary["worlds"][str(world)] = {"per_rank_seconds": row["per_rank_seconds"], "ratio": ratio, "parts": parts,
                                         "predict_seconds": row["predict_seconds"], "gram_rel_err": gram_err,
                                         "loss_rel_err": loss_err, "same_on_every_rank": row["same_on_every_rank"]}
    print(f"saved {save('kernel_sharding', summary)}")
    return summary


if __name__ == "__main__":
    main()
