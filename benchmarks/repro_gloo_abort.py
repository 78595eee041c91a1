"""Reproduction of the gloo abort at interpreter exit ("terminate called without an active exception").

No lightning_ttp anywhere: the abort is torch's (ProcessGroupGloo) and Lightning's (it never destroys a
gloo process group), seen through our ddp_spawn tests.

What it shows. A spawned process that exits with its gloo process group still alive can die with
SIGABRT *after* its work finished. Backtrace of the aborting thread (gdb on a core of ``plain keep``
and ``plain async``, torch 2.13.0+cpu, CPython 3.11.7)::

    std::terminate <- __gxx_personality_v0 <- _Unwind_ForcedUnwind <- pthread_exit
    <- PyThread_exit_thread <- take_gil <- PyEval_AcquireThread <- pybind11::gil_scoped_acquire
    <- ConcretePyInterpreterVTable::decref <- c10::TensorImpl::decref_pyobject
    <- std::vector<std::vector<at::Tensor>>::~vector <- ProcessGroupGloo::AsyncWork::~AsyncWork
    <- AsyncBroadcastWork::~AsyncBroadcastWork <- AsyncBarrierWork::~AsyncBarrierWork   (plain keep)
       (AsyncAllreduceWork::~AsyncAllreduceWork                                           (plain async))
    <- ProcessGroupGloo::runLoop        while the main thread is in Py_FinalizeEx -> PyGC_Collect

A gloo worker thread (``ProcessGroupGloo::runLoop``) drops its reference to a work only *after* it
has signalled the work's completion; the last collective's work (a barrier keeps the prior
broadcast's work, and so its tensors, alive) is then freed on that thread. Its tensors' Python
objects are by then owned by C++, so freeing them takes the GIL. If the main thread has meanwhile
reached ``Py_FinalizeEx``, CPython 3.11's ``take_gil`` ends the thread with ``pthread_exit``; the
forced unwind meets the noexcept ``~AsyncWork`` and libstdc++ calls ``std::terminate``. It is a
race (a thread preempted on a busy machine loses it). ``destroy_process_group()`` before exit
joins the worker threads while the interpreter is alive, and the abort is gone. Lightning destroys
the group at exit for NCCL only (``lightning_fabric/utilities/distributed.py``, ``_init_dist_connection``:
``if torch_distributed_backend == "nccl": atexit.register(_destroy_dist_connection)``) and
``DDPStrategy.teardown`` does not destroy it, so under ``ddp_spawn`` on CPU every spawned rank exits
with a live gloo group.

Measured on the 2-core shared machine (load ~1), 20 fresh runs per mode, each 2 spawned ranks; a run
counts when it exits non-zero or prints the terminate message::

    python benchmarks/repro_gloo_abort.py --runs 20 --scenario plain
      keep            4/20   (init, all_reduce, all_gather, broadcast_object_list, barrier, exit)
      destroy         0/20   (the same + destroy_process_group() before returning)
      async          17/20   (keep + an async all_reduce left in flight at exit)
      async+destroy   0/20
    python benchmarks/repro_gloo_abort.py --runs 20 --scenario lightning
      keep            0/20   (ddp_spawn, 2 CPU ranks, 4 steps of a plain LightningModule, no callbacks)
      destroy         0/20   (a callback's teardown destroys the group)
      atexit          0/20   (a callback's setup registers destroy_process_group at exit, as Lightning
                              does for NCCL)
      late            0/10   (--runs 10: an all_gather and a barrier in a callback's teardown)

The Lightning fit did not abort here (nor in an earlier session's 32 runs): after its last
collective a rank still saves rank zero's weights and returns its results before exiting, which
leaves the gloo worker time to drop the work; the race needs the worker thread descheduled for
that long (the aborts in our test suite came from heavier runs on a loaded machine). The plain
script puts the exit right after the last collective and shows the mechanism and the fix.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MESSAGE = "terminate called without an active exception"
PLAIN_MODES = ["keep", "destroy", "async", "async+destroy"]
LIGHTNING_MODES = ["keep", "destroy", "atexit", "late"]


# ---------------------------------------------------------------- plain torch.distributed, no Lightning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_worker(rank: int, world: int, port: int, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.ones(1000) * rank
    dist.all_reduce(t)
    out = [torch.empty(1000) for _ in range(world)]
    dist.all_gather(out, t)
    dist.broadcast_object_list([list(range(1000))], src=0)
    dist.barrier()
    if "async" in mode:
        dist.all_reduce(torch.ones(10**6), async_op=True)  # never waited for
    if "destroy" in mode:
        dist.destroy_process_group()


def _plain(mode: str) -> None:
    mp.spawn(_plain_worker, args=(2, _free_port(), mode), nprocs=2)


# ---------------------------------------------------------------- Lightning ddp_spawn, no lightning_ttp
if os.environ.get("REPRO_GLOO_LIGHTNING") == "1":  # the spawned ranks re-import this module
    import atexit

    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def _destroy() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    class DestroyAtTeardown(pl.Callback):
        def teardown(self, trainer, pl_module, stage):
            _destroy()

    class DestroyAtExit(pl.Callback):  # what Lightning does for NCCL, done for gloo too
        def setup(self, trainer, pl_module, stage):
            atexit.register(_destroy)

    class LateCollectives(pl.Callback):  # the last collectives as close to the rank's exit as a callback gets
        def teardown(self, trainer, pl_module, stage):
            trainer.strategy.all_gather(torch.ones(1000))
            trainer.strategy.barrier("late")


def _lightning(mode: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    callbacks = {"keep": [], "destroy": [DestroyAtTeardown()], "atexit": [DestroyAtExit()],
                 "late": [LateCollectives()]}[mode]
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--scenario", choices=["plain", "lightning"], default="plain")
    parser.add_argument("--modes", nargs="+", help=f"plain: {PLAIN_MODES}; lightning: {LIGHTNING_MODES}")
    parser.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)  # one run, in this interpreter
    args = parser.parse_args()
    if args.child:
        (_plain if args.scenario == "plain" else _lightning)(args.child)
        return
    env = dict(os.environ, REPRO_GLOO_LIGHTNING="1" if args.scenario == "lightning" else "0")
    for mode in args.modes or (PLAIN_MODES if args.scenario == "plain" else LIGHTNING_MODES):
        aborts = 0
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--scenario", args.scenario,
                                   "--child", mode], capture_output=True, text=True, env=env, timeout=600)
            aborts += done.returncode != 0 or MESSAGE in done.stdout + done.stderr
        print(f"{args.scenario:<9} {mode:<14} aborted {aborts} of {args.runs} runs", flush=True)


if __name__ == "__main__":
    main()
