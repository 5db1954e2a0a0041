"""The one stream of microbatches: training microbatches of each epoch in a seeded shuffle, and
after each epoch the test set's evaluation microbatches, right behind them in the same stream.

Evaluation therefore sees exactly the weights after that epoch (every stage handles microbatches
in stream order), and the next epoch's training microbatches follow without a pause. Sequence data
has a schedule of its own (pipeline/sequence.py: one microbatch per time step).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from forwardflow.pipeline.config import ScheduleConfig
from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch


def augment_images(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, drawn from ``generator``."""
    count, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    cols = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(count):
        crop = padded[i, :, rows[i] : rows[i] + height, cols[i] : cols[i] + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


class MicrobatchSchedule:
    def __init__(self, dataset: Dataset, config: ScheduleConfig, seed: int, augment: bool = False):
        self.dataset = dataset
        self.config = config
        self.seed = seed
        self.augment = augment

    @property
    def train_microbatches_per_epoch(self) -> int:
        return -(-len(self.dataset.train_y) // self.config.batch_size)

    @property
    def eval_microbatches_per_pass(self) -> int:
        return -(-len(self.dataset.test_y) // self.config.eval_batch_size)

    @property
    def total_train_microbatches(self) -> int:
        return self.train_microbatches_per_epoch * self.config.epochs

    @property
    def total_train_samples(self) -> int:
        return len(self.dataset.train_y) * self.config.epochs

    @property
    def scored_eval_samples(self) -> int:
        """Predictions one pass over the test set scores (sequence data: see SequenceSchedule)."""
        return len(self.dataset.test_y)

    def __len__(self) -> int:
        return self.config.epochs * (self.train_microbatches_per_epoch + self.eval_microbatches_per_pass)

    def __iter__(self) -> Iterator[Microbatch]:
        data, config = self.dataset, self.config
        generator = torch.Generator().manual_seed(self.seed)
        index = 0
        for epoch in range(config.epochs):
            order = torch.randperm(len(data.train_y), generator=generator)
            for start in range(0, len(order), config.batch_size):
                chosen = order[start : start + config.batch_size]
                inputs = data.train_x[chosen]
                if self.augment and inputs.dim() == 4:
                    inputs = augment_images(inputs, generator)
                yield Microbatch(index, TRAIN, epoch, inputs, data.train_y[chosen])
                index += 1
            for start in range(0, len(data.test_y), config.eval_batch_size):
                stop = start + config.eval_batch_size
                yield Microbatch(index, EVAL, epoch, data.test_x[start:stop], data.test_y[start:stop])
                index += 1
