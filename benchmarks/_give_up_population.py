"""Populations of training runs for ``benchmarks/give_up.py``, simulated fast in plain torch.

A population of N MLPs that share an architecture but differ in initialisation (and, for
the digits population, learning rate) is trained *as one batched model*: the weights of
layer l are an (N, d_in, d_out) tensor and every run gets its own mini-batch order. Adam
and RMSprop are element-wise, so the batched update is exactly N independent updates
(implemented here with a per-run learning rate). Every epoch we record each run's
validation accuracy and the normalised singular values of each hidden layer's (post-ReLU)
outputs on the first m validation samples, computed with the same
``lightning_ttp.spectral.spectrum_of`` the ``EarlyGiveUp`` callback uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_ttp.spectral import spectrum_of


@dataclass
class PopulationSpec:
    name: str
    dataset: str  # "shell" or "digits"
    dim: int  # input dimension (shell); ignored for digits
    hidden: tuple[int, ...]
    optimizer: str  # "adam" | "rmsprop"
    lr: float | tuple[float, float]  # fixed, or log-uniform range per run
    gain: tuple[float, float]  # Xavier-normal std multiplier, log-uniform range
    epochs: int
    n_train: int
    n_val: int
    m: int  # samples for the spectra
    runs: int
    batch: int = 32
    success: float = 0.65  # final val acc threshold for class y_1
    extra: dict = field(default_factory=dict)


@dataclass
class Population:
    spec: PopulationSpec
    seed: int
    val_acc: np.ndarray  # (N, E+1): epoch 0 (init) .. E
    spectra: list  # spectra[n][e][l] -> 1-D float64 tensor, e = 0..E
    units: list[int]
    gains: np.ndarray
    lrs: np.ndarray
    seconds: float = 0.0


def shell_data(dim: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two concentric shells of radius 1 (class 0) and 1.1 (class 1) in R^dim (DAI paper, Sec. IV-A)."""
    u = torch.randn(n, dim, generator=gen)
    u = u / u.norm(dim=1, keepdim=True)
    y = torch.randint(0, 2, (n,), generator=gen)
    r = torch.where(y == 1, torch.tensor(1.1), torch.tensor(1.0))
    return u * r[:, None], y


def digits_data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y, dtype=torch.long)
    p = torch.randperm(len(x), generator=gen)
    tr, va = p[:1200], p[1200:]
    return x[tr], y[tr], x[va], y[va]


def make_data(spec: PopulationSpec, seed: int):
    # the data set is fixed per population spec (seed 12345); only the runs vary with `seed`
    g = torch.Generator().manual_seed(12345)
    if spec.dataset == "shell":
        xtr, ytr = shell_data(spec.dim, spec.n_train, g)
        xva, yva = shell_data(spec.dim, spec.n_val, g)
        # the shells are thin in high dimension; standardise the scale like a data loader would
        scale = math.sqrt(spec.dim)
        return xtr * scale, ytr, xva * scale, yva, 2
    xtr, ytr, xva, yva = digits_data(g)
    return xtr, ytr, xva, yva, 10


def _init(sizes: list[int], gains: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    params = []
    n = gains.shape[0]
    for din, dout in zip(sizes[:-1], sizes[1:], strict=True):
        std = math.sqrt(2.0 / (din + dout))  # Xavier normal
        w = torch.randn(n, din, dout, generator=gen) * std * gains[:, None, None]
        b = torch.zeros(n, 1, dout)
        params += [w.requires_grad_(), b.requires_grad_()]
    return params


def _forward(params: list[torch.Tensor], x: torch.Tensor, keep: bool = False):
    hidden = []
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = (
            torch.baddbmm(params[2 * i + 1], h, params[2 * i])
            if h.dim() == 3
            else h @ params[2 * i] + params[2 * i + 1]
        )
        if i < n_layers - 1:
            h = torch.relu(h)
            if keep:
                hidden.append(h)
    return h, hidden


def simulate(spec: PopulationSpec, seed: int, log=print) -> Population:
    import time

    t_start = time.perf_counter()
    xtr, ytr, xva, yva, k = make_data(spec, seed)
    gen = torch.Generator().manual_seed(seed)
    n = spec.runs
    lo, hi = spec.gain
    gains = torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi), generator=gen))
    if isinstance(spec.lr, tuple):
        lrs = torch.exp(torch.empty(n).uniform_(math.log(spec.lr[0]), math.log(spec.lr[1]), generator=gen))
    else:
        lrs = torch.full((n,), float(spec.lr))
    sizes = [xtr.shape[1], *spec.hidden, k]
    params = _init(sizes, gains, gen)
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    lr_b = lrs[:, None, None]
    beta1, beta2, eps, rho = 0.9, 0.999, 1e-8, 0.99
    step = 0
    ntr = xtr.shape[0]
    steps_per_epoch = ntr // spec.batch
    xm = xva[: spec.m]
    val_acc = np.zeros((n, spec.epochs + 1))
    spectra: list[list[list[torch.Tensor]]] = [[] for _ in range(n)]
    units = list(spec.hidden)

    def record(epoch: int) -> None:
        with torch.no_grad():
            logits, _ = _forward(params, xva.unsqueeze(0).expand(n, -1, -1))
            val_acc[:, epoch] = (logits.argmax(-1) == yva[None]).float().mean(1).numpy()
            _, hid = _forward(params, xm.unsqueeze(0).expand(n, -1, -1), keep=True)
            for r in range(n):
                # float32, as the EarlyGiveUp callback does by default
                spectra[r].append([spectrum_of(h[r], torch.float32).values for h in hid])

    record(0)
    for epoch in range(1, spec.epochs + 1):
        perms = torch.stack([torch.randperm(ntr, generator=gen) for _ in range(n)])
        for s in range(steps_per_epoch):
            idx = perms[:, s * spec.batch : (s + 1) * spec.batch]
            xb, yb = xtr[idx], ytr[idx]
            logits, _ = _forward(params, xb)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, k), yb.reshape(-1), reduction="none")
            loss = loss.view(n, -1).mean(1).sum()  # sum over runs: independent gradients
            grads = torch.autograd.grad(loss, params)
            step += 1
            with torch.no_grad():
                for p, g, (m1, m2) in zip(params, grads, state, strict=True):
                    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                    if spec.optimizer == "adam":
                        m1.mul_(beta1).add_(g, alpha=1 - beta1)
                        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                        mh = m1 / (1 - beta1**step)
                        vh = m2 / (1 - beta2**step)
                        p.sub_(lr_b * mh / (vh.sqrt() + eps))
                    else:  # rmsprop (torch defaults: alpha=0.99, eps=1e-8)
                        m2.mul_(rho).addcmul_(g, g, value=1 - rho)
                        p.sub_(lr_b * g / (m2.sqrt() + eps))
        record(epoch)
        if epoch % 10 == 0 or epoch == spec.epochs:
            log(
                f"  [{spec.name} seed={seed}] epoch {epoch}/{spec.epochs}: median val acc "
                f"{np.median(val_acc[:, epoch]):.3f}, "
                f"successes {(val_acc[:, epoch] >= spec.success).sum()}/{n}"
                f" ({time.perf_counter() - t_start:.0f}s)"
            )
    return Population(
        spec, seed, val_acc, spectra, units, gains.numpy(), lrs.numpy(), time.perf_counter() - t_start
    )
