"""The one stream of microbatches: training microbatches of each epoch in a seeded shuffle, and
after each epoch the test set's evaluation microbatches, right behind them in the same stream.

Evaluation therefore sees exactly the weights after that epoch (every stage handles microbatches
in stream order), and the next epoch's training microbatches follow without a pause. Sequence data
has a schedule of its own (pipeline/sequence.py: one microbatch per time step).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

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


@dataclass
class StreamPosition:
    """Where the stream stands: enough to continue it exactly, microbatch for microbatch (the next
    index and epoch, the phase and offset within the epoch, the epoch's shuffled order, and the
    state of the generator that shuffles and augments)."""

    index: int = 0
    epoch: int = 0
    phase: str = TRAIN
    offset: int = 0  # samples of this epoch's phase already handed out
    order: torch.Tensor | None = None  # this epoch's training order, once drawn
    generator: torch.Tensor | None = None  # torch.Generator state; None: freshly seeded

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


class ScheduleStream:
    """The stream of a schedule from a position, one microbatch at a time; ``position()`` says
    where it stands between two microbatches. The generator is drawn from in the same order as an
    uninterrupted stream: the epoch's permutation first, then each microbatch's augmentation."""

    def __init__(self, schedule: MicrobatchSchedule, position: StreamPosition | None = None):
        self.schedule = schedule
        position = position or StreamPosition()
        self.generator = torch.Generator().manual_seed(schedule.seed)
        if position.generator is not None:
            self.generator.set_state(position.generator)
        self.index, self.epoch, self.phase, self.offset = (
            position.index,
            position.epoch,
            position.phase,
            position.offset,
        )
        self.order = position.order

    def position(self) -> StreamPosition:
        return StreamPosition(self.index, self.epoch, self.phase, self.offset, self.order, self.generator.get_state())

    def __iter__(self) -> ScheduleStream:
        return self

    def __next__(self) -> Microbatch:
        data, config = self.schedule.dataset, self.schedule.config
        while self.epoch < config.epochs:
            if self.phase == TRAIN:
                if self.order is None:
                    self.order = torch.randperm(len(data.train_y), generator=self.generator)
                if self.offset < len(self.order):
                    chosen = self.order[self.offset : self.offset + config.batch_size]
                    inputs = data.train_x[chosen]
                    if self.schedule.augment and inputs.dim() == 4:
                        inputs = augment_images(inputs, self.generator)
                    return self._emit(TRAIN, inputs, data.train_y[chosen], self.offset + config.batch_size)
                self.phase, self.offset = EVAL, 0
            if self.offset < len(data.test_y):
                stop = self.offset + config.eval_batch_size
                return self._emit(EVAL, data.test_x[self.offset : stop], data.test_y[self.offset : stop], stop)
            self.epoch, self.phase, self.offset, self.order = self.epoch + 1, TRAIN, 0, None
        raise StopIteration

    def _emit(self, phase: str, inputs: torch.Tensor, labels: torch.Tensor, offset: int) -> Microbatch:
        mb = Microbatch(self.index, phase, self.epoch, inputs, labels)
        self.index, self.offset = self.index + 1, offset
        return mb

    @property
    def at_epoch_end(self) -> bool:
        """The last microbatch handed out ended an epoch (its test pass included)."""
        return self.phase == EVAL and self.offset >= len(self.schedule.dataset.test_y)

    @property
    def can_cut(self) -> bool:
        """Whether ``position()`` continues the stream exactly (always, for these microbatches)."""
        return True


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
        return ScheduleStream(self)

    def stream(self, position: StreamPosition | None = None) -> ScheduleStream:
        """The stream from ``position`` (a checkpoint's), or from the start."""
        return ScheduleStream(self, position)
