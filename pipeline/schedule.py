"""The one stream of microbatches: training microbatches of each epoch in a seeded shuffle, and
after each epoch the test set's evaluation microbatches, right behind them in the same stream.

Evaluation therefore sees exactly the weights after that epoch (every stage handles microbatches
in stream order), and the next epoch's training microbatches follow without a pause.

The schedule yields plans (``MicrobatchPlan``: which samples, which crops and flips), drawn on the
host from one seeded generator; the first stage's data source makes the microbatches from them
where the data lives (``pipeline/source.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from forwardflow.pipeline.config import ScheduleConfig
from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, MicrobatchPlan
from forwardflow.pipeline.source import DataSource, draw_augmentation


class MicrobatchSchedule:
    def __init__(self, dataset: Dataset, config: ScheduleConfig, seed: int, augment: bool = False):
        self.dataset = dataset
        self.config = config
        self.seed = seed
        self.augment = augment and dataset.train_x.dim() == 4
        self._host: DataSource | None = None

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

    def __len__(self) -> int:
        return self.config.epochs * (self.train_microbatches_per_epoch + self.eval_microbatches_per_pass)

    def __iter__(self) -> Iterator[MicrobatchPlan]:
        config = self.config
        generator = torch.Generator().manual_seed(self.seed)
        index = 0
        for epoch in range(config.epochs):
            order = torch.randperm(len(self.dataset.train_y), generator=generator)
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                crops, flips = draw_augmentation(len(rows), generator) if self.augment else (None, None)
                yield MicrobatchPlan(index, TRAIN, epoch, rows, crops, flips)
                index += 1
            test_size = len(self.dataset.test_y)
            for start in range(0, test_size, config.eval_batch_size):
                rows = torch.arange(start, min(start + config.eval_batch_size, test_size))
                yield MicrobatchPlan(index, EVAL, epoch, rows)
                index += 1

    def read(self, plan: MicrobatchPlan) -> Microbatch:
        """The microbatch of ``plan``, made on the host (what the first stage makes on its device)."""
        if self._host is None:
            self._host = DataSource(self.dataset, "cpu")
        return self._host.read(plan)

    def inputs_of(self, plan: MicrobatchPlan) -> torch.Tensor:
        """The inputs of ``plan``, augmented, on the host (for a rule's feedback loop)."""
        return self.read(plan).inputs
