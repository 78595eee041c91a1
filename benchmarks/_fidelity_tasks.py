"""Tasks of ``benchmarks/fidelity.py``: generated data, backbones, pre-training (seeded).

* ``cnn``: 12×12 single-channel "texture" images. Each class is a random smooth prototype
  (Gaussian-filtered noise); a sample is its prototype shifted by up to ±2 pixels, with a
  random contrast and additive noise. A CNN with BatchNorm (conv–BN–ReLU–pool ×2, head) is
  pre-trained on classes 0–4 and fine-tuned on 5–9 (different prototypes) with a fresh head.
* ``mlp``: 24-dimensional Gaussian inputs, labels from a fixed random non-linear feature map
  h = tanh(W x) (8 features): the source task is argmax(A h) over 5 classes, the target task
  argmax(B h + noise) over 5 other classes. An MLP (24→64→64→5, ReLU) is pre-trained on the
  source and fine-tuned on the target with a fresh head.

Only numpy/scipy/torch; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

SIDE = 12
CLASSES = 5


def _textures(prototypes: np.ndarray, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(0, len(prototypes), n)
    images = np.empty((n, 1, SIDE, SIDE), dtype=np.float32)
    for i, c in enumerate(labels):
        dx, dy = rng.integers(-2, 3, 2)
        img = np.roll(prototypes[c], (dx, dy), axis=(0, 1)) * rng.uniform(0.7, 1.3)
        images[i, 0] = img + 0.6 * rng.standard_normal((SIDE, SIDE))
    return torch.from_numpy(images), torch.from_numpy(labels)


def _prototypes(rng: np.random.Generator, k: int) -> np.ndarray:
    protos = np.stack([gaussian_filter(rng.standard_normal((SIDE, SIDE)), 1.5, mode="wrap") for _ in range(k)])
    return protos / protos.std(axis=(1, 2), keepdims=True)


def _tabular(a: np.ndarray, w: np.ndarray, n: int, rng: np.random.Generator, noise: float):
    x = rng.standard_normal((n, w.shape[1])).astype(np.float32)
    h = np.tanh(x @ w.T)
    y = np.argmax(h @ a.T + noise * rng.standard_normal((n, a.shape[0])), axis=1)
    return torch.from_numpy(x), torch.from_numpy(y)


def source_and_target(arch: str, n_source: int, n_target: int, seed: int):
    """((x, y) source, (x, y) target pool); the generative task is fixed, the draw depends on ``seed``."""
    task = np.random.default_rng(1234)
    rng = np.random.default_rng(seed)
    if arch == "cnn":
        protos = _prototypes(task, 2 * CLASSES)
        return _textures(protos[:CLASSES], n_source, rng), _textures(protos[CLASSES:], n_target, rng)
    w = task.standard_normal((8, 24)) / np.sqrt(24) * 2.0
    a, b = task.standard_normal((CLASSES, 8)), task.standard_normal((CLASSES, 8))
    return _tabular(a, w, n_source, rng, 0.0), _tabular(b, w, n_target, rng, 0.3)


def backbone(arch: str) -> tuple[torch.nn.Module, int]:
    """(feature extractor, its width)."""
    if arch == "cnn":
        body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return body, 16
    body = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU())
    return body, 64


def pretrained_backbone(arch: str, source, *, steps: int = 300, seed: int = 0) -> torch.nn.Module:
    """The backbone after ``steps`` Adam steps (batch 128) on the source task."""
    torch.manual_seed(seed)
    body, width = backbone(arch)
    model = torch.nn.Sequential(body, torch.nn.Linear(width, CLASSES))
    adam_pretrain(model, *source, steps=steps, seed=seed)
    return body


def adam_pretrain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, seed: int) -> None:
    """``steps`` Adam steps (lr 3e-3) of cross-entropy on seeded random batches of 128, in place."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def with_fresh_head(body: torch.nn.Module, arch: str, seed: int) -> torch.nn.Module:
    """A copy of ``body`` with a new seeded linear head for the target task."""
    import copy

    torch.manual_seed(seed)
    return torch.nn.Sequential(copy.deepcopy(body), torch.nn.Linear(backbone(arch)[1], CLASSES))
