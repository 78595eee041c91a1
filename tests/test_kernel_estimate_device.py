"""estimate_kernel's Grams: the Adam kernel through the engine's fast paths against J P Jᵀ, and the
Grams (and the ODE's tensors) kept on the device and in the precision they were computed in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ttp.dynamics import OptimizerSpec, get_loss
from lightning_ttp.dynamics.ode import FunctionSpaceDrift
from lightning_ttp.pipeline.estimate import ADAM_V_FLOOR, _adam_second_moments, estimate_kernel
from tests.ntk_reference import reference_jacobian, relative_error


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(),
                         nn.Linear(36, 3))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


@pytest.mark.parametrize("make, shape", [(_mlp, (6,)), (_cnn, (1, 9, 9))])
@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_adam_kernel_is_j_p_jt(make, shape, kernel):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(10, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    ke = estimate_kernel(model, x, y, optimizer=optimizer, kernel=kernel, batch_size=4, seed=3)
    # the same second moments (the kernel's inputs), then P = diag(1/(√v + ε)) applied to torch.func's Jacobian
    params = list(model.parameters())
    loss = get_loss("cross_entropy")
    moments = _adam_second_moments(model, x, loss.prepare_targets(y, 3), loss, params, None, 4, 3)
    p = torch.cat([1 / (torch.maximum(v, ADAM_V_FLOOR * v.mean()).sqrt() + 1e-6).reshape(-1) for v in moments])
    jac = reference_jacobian(model, x)  # (N, C, D)
    if kernel == "full":
        flat = jac.reshape(-1, jac.shape[-1])
        reference = flat @ torch.diag(p) @ flat.T
    else:
        reference = torch.einsum("icd,d,jcd->ij", jac, p, jac) / 3
    assert ke.preconditioned
    assert relative_error(ke.grams[0], reference) <= 1e-6


def test_grams_keep_the_models_precision_and_device():
    torch.manual_seed(0)
    model = _mlp()  # float32
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters())):
        ke = estimate_kernel(model, x, y, optimizer=optimizer)
        assert all(g.dtype == torch.float32 and g.device == model[0].weight.device for g in ke.grams)
        assert ke.outputs.dtype == torch.float64


def test_ode_drift_lives_on_the_grams_device():
    """Meta tensors stand in for an accelerator: every tensor the drift builds follows the Grams."""
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, weight_decay=0.01))
    gram = torch.eye(8, device="meta")
    drift = FunctionSpaceDrift(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), [gram], get_loss("cross_entropy"),
                               spec, jvp_w0=[np.zeros((4, 2))])
    assert {drift.f0.device.type, drift.y.device.type, drift.jw[0].device.type} == {"meta"}
    assert drift.f0.dtype == torch.float64 and drift.grams[0].dtype == torch.float64
    u = torch.zeros(drift.state_groups, 3, 4, 2, dtype=torch.float64, device="meta")
    du = drift(u, np.array([0.1]))
    assert du.device.type == "meta" and du.shape == u.shape


@pytest.mark.parametrize("batch_norm", [False, True])
def test_fixed_preconditioner_for_sgd_specs(batch_norm):
    """estimate_kernel(..., parameter_scales=s) with an SGD spec: Θ = J diag(s²) Jᵀ (the closed loop's
    re-estimates under Adam), eval mode, and with train-mode BatchNorm through the batched Jacobian."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3)] if batch_norm else [
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)]
    model = nn.Sequential(*layers).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    with torch.no_grad():
        model(x)  # running statistics
    model.train(batch_norm)  # train-mode BatchNorm: the kernel of the subset as one batch
    scales = {p: torch.rand_like(p) + 0.1 for p in list(model.parameters())[:2]}  # the others: s = 1
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    ke = estimate_kernel(model, x, y, spec, kernel="full", parameter_scales=scales, batch_statistics=batch_norm)
    assert bool(ke.info.get("batch_statistics")) == batch_norm
    if batch_norm:
        model[1].track_running_stats = False  # batch statistics, no in-place update under jacrev
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    model.eval()
    flat = torch.cat([jac[k].reshape(30, -1) * scales.get(p, torch.ones_like(p)).reshape(-1)
                      for k, p in model.named_parameters()], dim=1)
    assert relative_error(ke.grams[0].to(torch.float64), flat @ flat.T) <= 1e-6
    with pytest.raises(ValueError, match="non-Adam"):
        estimate_kernel(model, x, y, optimizer=torch.optim.Adam(model.parameters()), parameter_scales=scales)
