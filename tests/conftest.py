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
