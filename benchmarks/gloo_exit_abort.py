"""Minimal reproduction of the ddp_spawn/gloo abort at interpreter exit, without lightning_ttp.

A spawned rank of a 2-process ``strategy="ddp_spawn"`` CPU fit sometimes dies at interpreter exit,
after the fit completed, with "terminate called without an active exception" (SIGABRT). Lightning
(``lightning_fabric.utilities.distributed._init_dist_connection``) registers
``destroy_process_group`` at exit for NCCL only; a gloo process group is left to the interpreter's
teardown, where the C++ ProcessGroupGloo is destroyed while its threads may still be joinable, and
``std::thread``'s destructor calls ``std::terminate`` (the suspected cause, to be confirmed by the
counts below; a plain ``torch.multiprocessing.spawn`` + gloo all-reduce without Lightning did not
abort in 20 runs). This script runs the same tiny fit (a plain
LightningModule, no callbacks of ours) ``--runs`` times in fresh interpreters, with and without a
callback that destroys the process group in ``teardown``, and counts the aborts.

    python benchmarks/gloo_exit_abort.py --runs 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

FIT = r"""
import sys, warnings
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import pytorch_lightning as pl

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 3)
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class Collectives(pl.Callback):  # what lightning_ttp's callbacks do across ranks, nothing else
    def on_fit_start(self, trainer, pl_module):
        trainer.strategy.broadcast({"payload": list(range(1000))}, src=0)

    def on_fit_end(self, trainer, pl_module):
        trainer.strategy.barrier("fit_end")


class Destroy(pl.Callback):
    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    warnings.simplefilter("ignore")
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    callbacks = {"keep": [], "destroy": [Destroy()], "collectives": [Collectives()],
                 "collectives+destroy": [Collectives(), Destroy()]}[sys.argv[1]]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["keep", "destroy", "collectives", "collectives+destroy"],
                        choices=["keep", "destroy", "collectives", "collectives+destroy"])
    args = parser.parse_args()
    # a file, not ``python -c``: the spawned ranks re-import the main module
    script = os.path.join(tempfile.mkdtemp(), "gloo_fit.py")
    with open(script, "w") as fh:
        fh.write(FIT)
    for mode in args.modes:
        aborts = 0
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, script, mode], capture_output=True, text=True)
            text = done.stdout + done.stderr
            aborts += done.returncode != 0 or "terminate called without an active exception" in text
        print(f"{mode:<22} aborted {aborts} of {args.runs} runs", flush=True)


if __name__ == "__main__":
    main()
