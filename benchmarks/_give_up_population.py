"""Populations of training runs for ``benchmarks/give_up.py``, simulated fast in plain torch.

A population of N networks that share an architecture but differ in initialisation scale,
optimiser (Adam or SGD with momentum) and learning rate is trained (a share of the runs in the
plateau regime — small initialisation, SGD, moderate learning rate — whose accuracy sits at
chance for a while and then rises late, or never) *as one vectorised model*:
``torch.func.stack_module_state`` stacks the N parameter sets, ``vmap(functional_call)``
runs them, every run gets its own mini-batch order, and the element-wise optimisers update
each run with its own learning rate, so the batched update is exactly N independent runs.

Every epoch each run's validation accuracy is recorded, and (up to ``spectra_until``, the
rounds the rule needs to decide at the checkpoint) its representation on the first m
validation samples is taken by the same :class:`lightning_ttp.spectral.ActivationRecorder`
the ``EarlyGiveUp`` callback uses (it finds the layers the same way), then turned into
normalised spectra and scales by the same :func:`lightning_ttp.spectral.spectrum_of`.

Three families, all on scikit-learn's 8x8 digits (1797 images, 10 classes):

* ``mlp``: MLP 64-64-64-32-10;
* ``cnn``: conv 8 - conv 16 - pool - Linear head (a backbone and one head);
* ``finetune``: the same CNN, pre-trained on digits 0-4 (once, seeded), fine-tuned on digits
  5-9 with a new head; the backbone's initial weights are the pre-trained ones, scaled by the
  run's gain only in the head.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from lightning_ttp.spectral import ActivationRecorder, spectrum_of


@dataclass
class PopulationSpec:
    name: str
    family: str  # "mlp" | "cnn" | "finetune"
    runs: int
    epochs: int
    gain: tuple[float, float]  # init std multiplier, log-uniform
    adam_lr: tuple[float, float]  # log-uniform
    sgd_lr: tuple[float, float]  # log-uniform
    sgd_share: float  # fraction of runs trained with SGD (momentum 0.9)
    success: float  # final val acc threshold
    late_share: float = 0.0  # fraction of runs in the plateau regime: SGD, small init, moderate lr
    late_gain: tuple[float, float] = (0.03, 0.3)
    late_lr: tuple[float, float] = (3e-3, 1e-1)
    m: int = 300
    batch: int = 64
    spectra_until: int = 16  # the rule needs the rounds up to the decision; later only divergence counts


@dataclass
class Population:
    spec: PopulationSpec
    seed: int
    val_acc: np.ndarray  # (N, E+1): epoch 0 (init) .. E
    nonfinite: np.ndarray  # (N, E+1): the run's validation outputs hold NaN/inf
    spectra: list  # spectra[n][e][l] -> 1-D float64 tensor, e = 0 .. min(E, spectra_until)
    scales: list  # scales[n][e][l] -> float
    units: list[int]
    gains: np.ndarray
    lrs: np.ndarray
    sgd: np.ndarray
    layers: list[str]
    seconds: float = 0.0
    seconds_per_epoch_per_run: float = 0.0


def _digits(gen: torch.Generator):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y, dtype=torch.long)
    p = torch.randperm(len(x), generator=gen)
    return x[p], y[p]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(16 * 16, classes)

    def forward(self, x):
        return self.head(self.backbone(x.view(-1, 1, 8, 8)))


def _pretrained_backbone(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """A CNN trained on digits 0-4 (Adam 1e-3, 15 epochs, seeded): the fine-tuning start."""
    torch.manual_seed(12345)
    net = CNN(10)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    keep = y < 5
    xs, ys = x[keep], y[keep]
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}


def _data(spec: PopulationSpec):
    x, y = _digits(torch.Generator().manual_seed(12345))
    if spec.family == "finetune":
        keep = y >= 5
        xt, yt = x[keep], y[keep]  # labels 5..9 in a 10-way head, as a user re-using the head size would
        n = len(xt)
        return x, y, xt[: int(0.65 * n)], yt[: int(0.65 * n)], xt[int(0.65 * n) :], yt[int(0.65 * n) :]
    return x, y, x[:1200], y[:1200], x[1200:], y[1200:]


def _models(spec: PopulationSpec, gains: torch.Tensor, gen: torch.Generator, x_all, y_all) -> list[nn.Module]:
    pretrained = _pretrained_backbone(x_all, y_all) if spec.family == "finetune" else None
    models = []
    for g in gains.tolist():
        net = MLP() if spec.family == "mlp" else CNN()
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / fan_in) * g)
                else:
                    p.zero_()
            if pretrained is not None:
                net.backbone.load_state_dict(pretrained)
        models.append(net)
    return models


def simulate(spec: PopulationSpec, seed: int, log=print) -> Population:
    t_start = time.perf_counter()
    x_all, y_all, xtr, ytr, xva, yva = _data(spec)
    gen = torch.Generator().manual_seed(seed)
    n = spec.runs

    def loguniform(lo_hi):
        lo, hi = lo_hi
        return torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi), generator=gen))

    gains = loguniform(spec.gain)
    sgd = torch.rand(n, generator=gen) < spec.sgd_share
    lrs = torch.where(sgd, loguniform(spec.sgd_lr), loguniform(spec.adam_lr))
    # the plateau regime (small init, SGD): runs that sit at chance for a while, then learn or never do
    late = torch.arange(n) < round(spec.late_share * n)
    gains = torch.where(late, loguniform(spec.late_gain), gains)
    lrs = torch.where(late, loguniform(spec.late_lr), lrs)
    sgd = sgd | late
    models = _models(spec, gains, gen, x_all, y_all)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    probe = copy.deepcopy(models[0])

    def loss_fn(p, b, xb, yb):
        out = functional_call(base, (p, b), (xb,))
        return nn.functional.cross_entropy(out, yb)

    grad_fn = vmap(torch.func.grad(loss_fn), in_dims=(0, 0, 0, 0))
    predict = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, None))
    m1 = {k: torch.zeros_like(v) for k, v in params.items()}
    m2 = {k: torch.zeros_like(v) for k, v in params.items()}

    def per_run(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (ref.dim() - 1)))

    val_acc = np.zeros((n, spec.epochs + 1))
    nonfinite = np.zeros((n, spec.epochs + 1), dtype=bool)
    spectra: list[list] = [[] for _ in range(n)]
    scales: list[list] = [[] for _ in range(n)]
    recorder = ActivationRecorder(spec.m)
    xm = xva[: spec.m]

    def record(epoch: int) -> None:
        with torch.no_grad():
            logits = predict(params, buffers, xva)
            finite = torch.isfinite(logits).all(-1)
            val_acc[:, epoch] = ((logits.argmax(-1) == yva[None]) & finite).float().mean(1).numpy()
            nonfinite[:, epoch] = (~finite).any(1).numpy()
            if epoch > spec.spectra_until:
                return
            for r in range(n):
                recorder.attach(probe)
                recorder.start_batch(len(xm))
                run_state = ({k: v[r] for k, v in params.items()}, {k: v[r] for k, v in buffers.items()})
                functional_call(probe, run_state, (xm,))
                recorder.end_batch()
                specs = [spectrum_of(mat) for mat in recorder.matrices()]
                recorder.detach()
                spectra[r].append([s.values for s in specs])
                scales[r].append([s.scale for s in specs])

    record(0)
    ntr = len(xtr)
    steps = ntr // spec.batch
    beta1, beta2, eps, mom = 0.9, 0.999, 1e-8, 0.9
    t_train = 0.0
    for epoch in range(1, spec.epochs + 1):
        t0 = time.perf_counter()
        perms = torch.stack([torch.randperm(ntr, generator=gen) for _ in range(n)])
        for s in range(steps):
            idx = perms[:, s * spec.batch : (s + 1) * spec.batch]
            grads = grad_fn(params, buffers, xtr[idx], ytr[idx])
            step = (epoch - 1) * steps + s + 1
            with torch.no_grad():
                for k, p in params.items():
                    g = torch.nan_to_num(grads[k], nan=0.0, posinf=0.0, neginf=0.0)
                    lr, is_sgd = per_run(lrs, p), per_run(sgd, p)
                    m1[k].mul_(beta1).add_(g, alpha=1 - beta1)  # Adam's first moment ...
                    m2[k] = torch.where(is_sgd, mom * m2[k] + g, beta2 * m2[k] + (1 - beta2) * g * g)  # ... or SGD's
                    adam = lr * (m1[k] / (1 - beta1**step)) / ((m2[k] / (1 - beta2**step)).sqrt() + eps)
                    p.sub_(torch.where(is_sgd, lr * m2[k], adam))
        t_train += time.perf_counter() - t0
        record(epoch)
        if epoch % 20 == 0 or epoch == spec.epochs:
            log(
                f"  [{spec.name} seed={seed}] epoch {epoch}/{spec.epochs}: median val acc "
                f"{np.median(val_acc[:, epoch]):.3f}, successes {(val_acc[:, epoch] >= spec.success).sum()}/{n}"
                f" ({time.perf_counter() - t_start:.0f}s)"
            )
    return Population(
        spec, seed, val_acc, nonfinite, spectra, scales, [layer.units for layer in recorder.layers or []],
        gains.numpy(), lrs.numpy(), sgd.numpy(), [layer.label for layer in recorder.layers or []],
        time.perf_counter() - t_start, t_train / (spec.epochs * n),
    )
