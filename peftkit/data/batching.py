"""Batch order and collation: which examples each process trains on, and as what tensors."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from peftkit.data.example import IGNORE, Example


@dataclass(frozen=True)
class Position:
    """Where the data stream stands: the next micro-batch to train on."""

    epoch: int = 0
    index: int = 0  # micro-batch index within the epoch (global, all processes together)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of the training rows, fixed by seed and epoch (so resume can replay it)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class BatchStream:
    """Micro-batches for one process.

    A global micro-batch is `batch_size * world` consecutive rows of the epoch's permutation;
    process `rank` takes its own contiguous slice, so every row is seen once per epoch across
    all processes and one process with batch b*w sees exactly the rows of w processes with b.
    Incomplete tail batches are dropped.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, position: Position = Position()):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world = rank, world
        self.position = position
        self.per_epoch = len(examples) // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError("fewer training rows than one global micro-batch")
        self._order_epoch = position.epoch
        self._order = epoch_order(len(examples), seed, position.epoch)

    def next(self) -> list[Example]:
        epoch, index = self.position.epoch, self.position.index
        if index >= self.per_epoch:
            epoch, index = epoch + 1, 0
        if epoch != self._order_epoch:  # a new epoch, or `position` was set (resume)
            self._order_epoch = epoch
            self._order = epoch_order(len(self.examples), self.seed, epoch)
        start = (index * self.world + self.rank) * self.batch_size
        rows = self._order[start:start + self.batch_size]
        self.position = Position(epoch, index + 1)
        return [self.examples[i] for i in rows]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padded positions are masked out of attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_tokens(batch: list[Example]) -> int:
    """Positions that carry loss after the next-token shift (the first label never does)."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in batch)


def useful_tokens(batch: list[Example]) -> int:
    return sum(len(e.input_ids) for e in batch)
