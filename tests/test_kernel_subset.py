"""The subset kernel made to stand for the whole training set (``lightning_ttp.kernel.subset``).

The reference is the curve simulated on the kernel of all N samples: a subset's kernel is the
full kernel's rows and columns, so the comparison isolates the N0/N over-weight of each
sample's own term from the kernel's estimate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ttp.dynamics import OptimizerSpec
from lightning_ttp.kernel.subset import idiosyncratic_share, stand_for_dataset
from lightning_ttp.pipeline.estimate import KernelEstimate, estimate_kernel, standing_for
from lightning_ttp.pipeline.simulate import simulate


def _low_rank_plus_nugget(n0: int, c: int, rank: int, nugget: float, seed: int = 0) -> torch.Tensor:
    """(ΦΦᵀ ⊗ I_C) + σ²·I with unit-norm features: every self block is (1 + σ²)·I_C."""
    phi = torch.randn(n0, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    phi = phi / phi.norm(dim=1, keepdim=True)
    return torch.kron(phi @ phi.T, torch.eye(c, dtype=torch.float64)) + nugget * torch.eye(n0 * c, dtype=torch.float64)


def test_the_nugget_of_a_low_rank_kernel_is_recovered_exactly():
    n0, c, n, sigma2 = 64, 3, 512, 0.25
    gram = _low_rank_plus_nugget(n0, c, rank=8, nugget=sigma2)
    assert idiosyncratic_share(gram, n0) == pytest.approx(sigma2 / (1 + sigma2), rel=1e-9)
    corrected, share = stand_for_dataset(gram, n0, n)
    expected = gram - (1 - n0 / n) * sigma2 * torch.eye(n0 * c, dtype=torch.float64)
    torch.testing.assert_close(corrected, expected, rtol=1e-10, atol=1e-10)


def test_a_kernel_the_samples_share_is_left_as_it_is():
    n0, c = 300, 2  # more rows than the screening block: the cheap bound decides
    g = torch.randn(n0 * c, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = g @ g.T + 3.0 + 1e-4 * torch.eye(n0 * c, dtype=torch.float64)
    corrected, share = stand_for_dataset(gram, n0, 10 * n0)
    assert share == 0.0 and corrected is gram


@pytest.mark.parametrize("seed", range(4))
def test_the_corrected_kernel_stays_positive_semi_definite(seed):
    gen = torch.Generator().manual_seed(seed)
    n0, c = 40, 2
    a = torch.randn(n0 * c, 30, generator=gen, dtype=torch.float64) * torch.rand(n0 * c, 1, generator=gen,
                                                                                 dtype=torch.float64)
    gram = a @ a.T + torch.diag(1 + 3 * torch.rand(n0 * c, generator=gen, dtype=torch.float64))
    corrected, share = stand_for_dataset(gram, n0, 50 * n0)
    assert 0.0 < share <= 1.0
    eig = torch.linalg.eigvalsh(corrected)
    assert eig.min() >= -1e-10 * eig.max()
    # the shared part is untouched: only the self blocks move
    off = torch.ones(n0, c, n0, c, dtype=torch.bool)
    off[torch.arange(n0), :, torch.arange(n0), :] = False
    torch.testing.assert_close(corrected.view(n0, c, n0, c)[off], gram.view(n0, c, n0, c)[off])


def _restricted(full: KernelEstimate, n: int, c: int, idx: torch.Tensor) -> KernelEstimate:
    g = full.grams[0].reshape(n, c, n, c)[idx][:, :, idx].reshape(len(idx) * c, len(idx) * c)
    return KernelEstimate(full.outputs[idx], full.targets[idx], [g], "full", full.loss)


def test_the_corrected_subset_simulates_the_curve_of_the_full_kernel():
    """A linear model on [shared low-dimensional features, nearly orthogonal per-sample features]:
    the kernel on N0 = N/8 samples trains its own samples 8 times too fast; corrected, it
    follows the curve simulated on all N samples."""
    n, n0, c, steps = 1024, 128, 2, 300
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(n, 6, generator=gen)
    shared = shared / shared.norm(dim=1, keepdim=True)
    own = torch.randn(n, 4096, generator=gen) / 4096 ** 0.5
    x = torch.cat([shared, 0.8 * own], dim=1)
    y = torch.randn(n, c, generator=gen)
    model = torch.nn.Linear(x.shape[1], c, bias=False)
    torch.nn.init.zeros_(model.weight)
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.5))
    full = estimate_kernel(model, x, y, spec, loss="mse", kernel="full")
    reference = simulate(full, spec, steps, None)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:n0].sort().values
    subset = _restricted(full, n, c, idx)
    corrected = standing_for(subset, n)
    assert corrected.info["idiosyncratic_share"][0] > 0.2
    raw = simulate(subset, spec, steps, None, dataset_size=n)
    fixed = simulate(corrected, spec, steps, None, dataset_size=n)
    # α is a lower bound of the per-sample share (the Marchenko–Pastur spread of the nearly
    # orthogonal features takes some of it): the correction removes part of the bias, all of it
    # never, and never overshoots
    for eps in (0.6, 0.4, 0.2, 0.1):
        real, before, after = reference.training_time(eps), raw.training_time(eps), fixed.training_time(eps)
        assert real - before > 0.1 * real  # the subset is too fast: the bias this corrects
        assert before < after <= real
        assert real - after < 0.75 * (real - before)
    late, before, after = (float(np.asarray(r.loss)[-1]) for r in (reference, raw, fixed))
    assert before < after < late and late - after < 0.5 * (late - before)


def test_predict_training_time_corrects_its_subset_and_says_so(monkeypatch):
    """Through the public entry point: a kernel on 64 of 512 samples with per-sample features."""
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_ttp.pipeline.predict
    from lightning_ttp import predict_training_time

    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(512, 4, generator=gen), torch.randn(512, 2048, generator=gen) / 2048 ** 0.5], 1)
    y = torch.randn(512, 2, generator=gen)
    model = torch.nn.Linear(x.shape[1], 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    loader = DataLoader(TensorDataset(x, y), batch_size=512)
    common = dict(loss="mse", num_samples=64, budget=None, lookahead=False)
    pred = predict_training_time(model, loader, opt, 50, **common)
    assert pred.diagnostics.kernel_samples == 64 and pred.diagnostics.extra["idiosyncratic_share"][0] > 0.05
    monkeypatch.setattr(lightning_ttp.pipeline.predict, "standing_for", lambda kernel, n: kernel)
    raw = predict_training_time(model, loader, opt, 50, **common)
    assert "idiosyncratic_share" not in raw.diagnostics.extra
    assert raw.loss[-1] < pred.loss[-1] < raw.loss[0]  # the subset alone memorises too fast
