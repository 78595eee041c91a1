"""The one data module: subset sampling, batch splitting, logits extraction."""

from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_ttp.pipeline.data import concat_batches, logits_of, sample_subset, split_batch, take


def _loader(n=40, **kw):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(n)
    return DataLoader(TensorDataset(x, y), **kw)


def test_subset_is_seeded_and_independent_of_loader_order_and_global_rng():
    a, n = sample_subset(_loader(batch_size=8, shuffle=True), 10, seed=3)
    torch.manual_seed(123)
    b, _ = sample_subset(_loader(batch_size=5, shuffle=False), 10, seed=3)
    assert n == 10
    assert torch.equal(a[1], b[1])
    expected = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:10].sort().values
    assert torch.equal(a[1], expected)
    assert torch.equal(a[0][:, 0], expected.float())
    c, _ = sample_subset(_loader(batch_size=8), 10, seed=4)
    assert not torch.equal(a[1], c[1])


def test_subset_never_repeats_samples_when_the_data_is_small():
    batch, n = sample_subset(_loader(n=6, batch_size=4), 50, seed=0)
    assert n == 6 and sorted(batch[1].tolist()) == list(range(6))


def test_prebatched_map_dataset_keeps_the_batches_shape():
    items = [(torch.randn(4, 3), torch.randint(0, 5, (4,))) for _ in range(5)]
    loader = DataLoader(items, batch_size=None)
    batch, n = sample_subset(loader, 10, seed=0)
    assert n == 10 and batch[0].shape == (10, 3) and batch[1].shape == (10,)


def test_iterable_dataset_takes_the_first_samples_and_keeps_the_global_rng():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(30):
                yield torch.full((2,), float(i)), i

    state = torch.get_rng_state()
    batch, n = sample_subset(DataLoader(Stream(), batch_size=4), 9, seed=0)
    assert n == 9 and batch[1].tolist() == list(range(9))
    assert torch.equal(state, torch.get_rng_state())


def test_concat_and_take_handle_dicts_namedtuples_and_numpy():
    Pair = namedtuple("Pair", "x y")
    parts = [{"a": Pair(torch.ones(2, 1), np.zeros(2)), "tag": "t"},
             {"a": Pair(torch.zeros(3, 1), np.ones(3)), "tag": "t"}]
    out = concat_batches(parts)
    assert isinstance(out["a"], Pair) and out["a"].x.shape == (5, 1) and out["a"].y.tolist() == [0, 0, 1, 1, 1]
    assert out["tag"] == "t"
    assert take(out, 2)["a"].x.shape == (2, 1)


def test_split_batch_convention():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_batch((x, y, "extra"))[0] is x
    assert split_batch({"x": x, "y": y})[1] is y
    batch = {"features": x, "label": y}
    inputs, targets = split_batch(batch, output_fn=lambda m, b: b, target_fn=lambda b: b["label"])
    assert inputs is batch and targets is y
    with pytest.raises(TypeError, match="target_fn=lambda batch"):
        split_batch(batch)
    with pytest.raises(TypeError, match="output_fn=lambda model, batch"):
        split_batch(batch, target_fn=lambda b: b["label"])


def test_logits_of_model_outputs():
    t = torch.randn(2, 3)

    class ModelOutput(dict):
        def __getattr__(self, k):
            return self[k]

    assert logits_of(t) is t
    assert logits_of((t, torch.zeros(1))) is t
    assert logits_of({"loss": torch.zeros(()), "logits": t}) is t
    assert logits_of(ModelOutput(logits=t)) is t
    with pytest.raises(TypeError, match="output_fn"):
        logits_of({"hidden": t})
