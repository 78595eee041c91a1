"""ActivationRecorder: which representation it finds and that it records it exactly (pure torch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ttp.spectral import ActivationRecorder


def record(model: nn.Module, batches: list[torch.Tensor], m: int, layers=None):
    rec = ActivationRecorder(m, layers)
    rec.attach(model)
    with torch.no_grad():
        for x in batches:
            rec.start_batch(x.shape[0])
            model(x)
            rec.end_batch()
    mats = rec.matrices()
    rec.detach()
    return rec, mats


class BackboneHead(nn.Module):
    """A conv backbone and one Linear head (how torchvision/timm classifiers are built), plus an
    auxiliary Linear registered after the head that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_mlp_hidden_layers_post_activation_and_head_input():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    xs = [torch.randn(8, 5), torch.randn(8, 5)]
    rec, mats = record(mlp, xs, m=12)
    # the second Tanh output is the head's input: kept once
    assert [layer.label for layer in rec.layers] == ["1", "4 (input)"]
    x = torch.cat(xs)[:12]
    h1 = torch.relu(mlp[0](x))
    torch.testing.assert_close(mats[0], h1)
    torch.testing.assert_close(mats[1], torch.tanh(mlp[2](h1)))


def test_backbone_with_one_head_finds_the_head_and_pooled_stages():
    torch.manual_seed(0)
    model = BackboneHead()
    x = torch.randn(10, 1, 6, 6)
    rec, mats = record(model, [x], m=10)
    assert [layer.label for layer in rec.layers] == ["backbone.1", "head (input)"]  # not the unused aux
    torch.testing.assert_close(mats[0], torch.relu(model.backbone[0](x)).mean(dim=(2, 3)))
    torch.testing.assert_close(mats[1], model.backbone(x))


def test_lstm_tuple_output_is_recorded():
    """Measured: an LSTM layer (tuple output) recorded 0 rows."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = lstm, nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    net = Net()
    x = torch.randn(6, 4, 3)
    rec, mats = record(net, [x], m=6, layers=["lstm"])
    assert mats[0].shape == (6, 5)
    torch.testing.assert_close(mats[0], lstm(x)[0].mean(dim=1))  # (B, T, H): the sequence averaged


def test_sequence_first_transformer_rows_are_samples():
    """Measured: nn.TransformerEncoder(batch_first=False) rows were taken along the sequence axis.
    Here the sequence length equals the batch size, so only batch_first can tell them apart."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="enable_nested_tensor"):
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False), 1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.head = enc, nn.Linear(8, 2)

        def forward(self, x):  # x: (B, T, d)
            return self.head(self.enc(x.transpose(0, 1)).mean(0))

    net = Net().eval()
    b = 5
    x = torch.randn(b, b, 8)
    rec, mats = record(net, [x], m=b, layers=["enc"])
    assert rec.layers[0].sample_axis == 1
    torch.testing.assert_close(mats[0], enc(x.transpose(0, 1)).mean(0))


def test_rows_stop_at_num_samples_and_layers_are_kept_across_rounds():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    rec = ActivationRecorder(10)
    for _ in range(2):  # two rounds
        rec.attach(mlp)
        for _ in range(3):
            rec.start_batch(4)
            mlp(torch.randn(4, 4))
            rec.end_batch()
        assert [m.shape[0] for m in rec.matrices()] == [10]
        rec.detach()
    assert len(mlp[1]._forward_hooks) == 0 and len(mlp[2]._forward_pre_hooks) == 0
