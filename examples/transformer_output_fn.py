"""Fine-tune a small transformer (sequence classification) with ``TrainingTimePredictor(output_fn=...)``.

The batches are dictionaries, as a tokenizer and a collator give them (``input_ids``,
``attention_mask``, ``labels``), and the model returns a dictionary with ``logits``, as Hugging
Face models do. The predictor cannot guess how to call such a model, so it is told:
``output_fn(pl_module, batch)`` gives the (N, C) logits and ``target_fn(batch)`` the labels.

The data is generated (nothing is downloaded): sequences of 12–24 word ids from 4 "topics" of 10
words each. A 2-layer encoder is pre-trained to name the dominant topic (4 classes, plain torch,
a few seconds), then fine-tuned with Lightning on a new task with a new head: is the dominant
topic even or odd (2 classes)::

    python examples/transformer_output_fn.py
    python examples/transformer_output_fn.py --train-size 128 --epochs 2 --kernel-samples 32   # quicker
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ttp import ETAProgressBar, TrainingTimePredictor

PAD, TOPICS, WORDS_PER_TOPIC, MAX_LEN = 0, 4, 10, 24


class TopicSequences(Dataset):
    """Padded word-id sequences; ``topic`` is the topic of 60 % of the words, the rest is noise."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.topic = torch.randint(TOPICS, (size,), generator=g)
        lengths = torch.randint(12, MAX_LEN + 1, (size,), generator=g)
        on_topic = torch.rand(size, MAX_LEN, generator=g) < 0.6
        topic = torch.where(
            on_topic,
            self.topic[:, None],
            torch.randint(TOPICS, (size, MAX_LEN), generator=g),
        )
        words = (
            1
            + topic * WORDS_PER_TOPIC
            + torch.randint(WORDS_PER_TOPIC, (size, MAX_LEN), generator=g)
        )
        self.attention_mask = (torch.arange(MAX_LEN) < lengths[:, None]).long()
        self.input_ids = words * self.attention_mask  # PAD = 0 after the end
        self.labels = self.topic

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


class TinyTransformer(nn.Module):
    """Embeddings + a 2-layer ``nn.TransformerEncoder`` + mean pooling + a linear head."""

    def __init__(self, num_classes: int, d_model: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(
            1 + TOPICS * WORDS_PER_TOPIC, d_model, padding_idx=PAD
        )
        self.position = nn.Embedding(MAX_LEN, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        h = self.embed(input_ids) + self.position(
            torch.arange(input_ids.shape[1], device=input_ids.device)
        )
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"logits": self.head((h * mask).sum(1) / mask.sum(1))}


def pretrain(model: TinyTransformer, steps: int = 150) -> None:
    """Name the dominant topic (4 classes): the 'pre-training' whose features the fine-tuning reuses."""
    loader = DataLoader(TopicSequences(2000, seed=1), batch_size=64, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    done = 0
    while done < steps:
        for batch in loader:
            loss = nn.functional.cross_entropy(
                model(batch["input_ids"], batch["attention_mask"])["logits"],
                batch["labels"],
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    print(f"[transformer] pre-trained {steps} steps, last loss {loss.item():.3f}")


class EvenOddTopic(TopicSequences):
    """The fine-tuning task: is the dominant topic even (0) or odd (1)?"""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size, seed)
        self.labels = self.topic % 2


class FineTuner(LightningModule):
    def __init__(self, model: TinyTransformer, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.model(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(
            self(batch["input_ids"], batch["attention_mask"])["logits"], batch["labels"]
        )
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])["logits"]
        self.log(
            "val_acc",
            (logits.argmax(1) == batch["labels"]).float().mean(),
            prog_bar=True,
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> TrainingTimePredictor:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument(
        "--kernel-samples", type=int, default=96, help="samples in the NTK subset"
    )
    parser.add_argument("--out", default="runs/transformer_output_fn")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a model this small trains faster on one CPU thread
    seed_everything(0, verbose=False)
    model = TinyTransformer(num_classes=TOPICS)
    pretrain(model)
    model.head = nn.Linear(
        model.head.in_features, 2
    )  # new task, new head; all layers are fine-tuned

    predictor = TrainingTimePredictor(
        num_samples=args.kernel_samples,
        output_fn=lambda pl_module, batch: pl_module(
            batch["input_ids"], batch["attention_mask"]
        )["logits"],
        target_fn=lambda batch: batch["labels"],
    )
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=args.out,
        callbacks=[predictor, ETAProgressBar(refresh_rate=5)],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(
        FineTuner(model, args.lr),
        DataLoader(EvenOddTopic(args.train_size, seed=2), batch_size=32, shuffle=True),
        DataLoader(EvenOddTopic(256, seed=3), batch_size=256),
    )
    return predictor


if __name__ == "__main__":
    main()
