"""The preconditioned kernel Θ_P = J diag(s²) Jᵀ through the fast paths, against J P Jᵀ from torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ttp.kernel import empirical_ntk
from tests.ntk_reference import reference_jacobian, relative_error
from tests.test_kernel import _case

TOL = 1e-5


def _scales(model: nn.Module, seed: int = 1) -> dict[nn.Parameter, torch.Tensor]:
    """Positive, far from constant scales (like Adam's (√v + ε)^{-1/2} spread over decades)."""
    generator = torch.Generator().manual_seed(seed)
    return {p: torch.exp(2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            for p in model.parameters() if p.requires_grad}


def _reference(model: nn.Module, inputs, scales: dict[nn.Parameter, torch.Tensor], kernel: str = "full"):
    jac = reference_jacobian(model, inputs)  # (N, C, D), parameters in named_parameters order
    s = torch.cat([scales[p].reshape(-1) for p in model.parameters() if p.requires_grad])
    scaled = jac * s
    n, c, d = jac.shape
    if kernel == "trace":
        return torch.einsum("icd,jcd->ij", scaled, scaled)
    return scaled.reshape(n * c, d) @ scaled.reshape(n * c, d).T


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention", "transformer"])
@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_preconditioned_gram_matches_torch_func(name, kernel):
    model, inputs = _case(name)
    scales = _scales(model)
    ntk = empirical_ntk(model, inputs, kernel=kernel, parameter_scales=scales)
    reference = _reference(model, inputs, scales, kernel)
    assert relative_error(ntk.gram, reference) <= TOL
    # the scales matter: the plain kernel is far from the preconditioned one
    assert relative_error(empirical_ntk(model, inputs, kernel=kernel).gram, reference) > 0.1


def test_preconditioned_dense_layers_use_the_ghost_contraction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    x = torch.randn(6, 300, dtype=torch.float64)
    scales = _scales(model)
    ntk = empirical_ntk(model, x, parameter_scales=scales)
    assert ntk.methods["0.weight"] == "ghost"
    assert relative_error(ntk.gram, _reference(model, x, scales)) <= TOL


def test_preconditioned_groups_and_chunks():
    model, x = _case("cnn")
    scales = _scales(model)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    ntk = empirical_ntk(model, x, parameter_groups=[weights, biases], parameter_scales=scales, chunk_size=4)
    assert relative_error(ntk.gram, _reference(model, x, scales)) <= TOL
    for p in weights:
        p.requires_grad_(False)
    assert relative_error(ntk.grams[1], _reference(model, x, scales)) <= TOL


@pytest.mark.parametrize("projection", ["gaussian", "kronecker"])
def test_preconditioned_projection_is_unbiased(projection):
    model, x = _case("mlp")
    scales = _scales(model)
    reference = _reference(model, x, scales)
    runs = [empirical_ntk(model, x, projection_dim=64, projection=projection, parameter_scales=scales, seed=seed).gram
            for seed in range(200)]
    assert relative_error(torch.stack(runs).mean(0), reference) < 0.1
    assert relative_error(runs[0], reference) > relative_error(torch.stack(runs).mean(0), reference)


def test_scales_of_the_wrong_shape_are_refused():
    model, x = _case("mlp")
    with pytest.raises(ValueError, match="parameter_scales"):
        empirical_ntk(model, x, parameter_scales={model[0].weight: torch.ones(3)})
