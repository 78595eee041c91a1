"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared machine (restored after).

    Opt-in per test module with ``pytestmark = pytest.mark.usefixtures("_one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: ddp_spawn on gloo: a spawned rank sometimes aborts at interpreter exit, *after* the fit completed
#: and its results were written ("terminate called without an active exception"): torch's gloo worker
#: thread racing Py_FinalizeEx, as Lightning never destroys a gloo group (benchmarks/repro_gloo_abort.py,
#: docs/plugin.md). Distributed tests rerun on that failure only, never on a wrong result.
GLOO_EXIT_ABORT = pytest.mark.flaky(
    reruns=2, only_rerun=["terminated with signal SIGABRT", "terminate called without an active exception"]
)
