"""The one stream of microbatches: training microbatches of each epoch in a seeded shuffle, and
after each epoch the test set's evaluation microbatches, right behind them in the same stream.

Evaluation therefore sees exactly the weights after that epoch (every stage handles microbatches
in stream order), and the next epoch's training microbatches follow without a pause. Sequence data
has a schedule of its own (pipeline/sequence.py: one microbatch per time step).

The schedule yields plans (``MicrobatchPlan``: which samples, which crops and flips), drawn on the
host from one seeded generator; the first stage's data source makes the microbatches from them
where the data lives (``pipeline/source.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from forwardflow.pipeline.config import ScheduleConfig
from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, MicrobatchPlan
from forwardflow.pipeline.source import DataSource, draw_augmentation


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

    def __next__(self) -> MicrobatchPlan:
        data, config = self.schedule.dataset, self.schedule.config
        while self.epoch < config.epochs:
            if self.phase == TRAIN:
                if self.order is None:
                    self.order = torch.randperm(len(data.train_y), generator=self.generator)
                if self.offset < len(self.order):
                    rows = self.order[self.offset : self.offset + config.batch_size]
                    crops, flips = (None, None)
                    if self.schedule.augment:
                        crops, flips = draw_augmentation(len(rows), self.generator)
                    plan = MicrobatchPlan(self.index, TRAIN, self.epoch, rows, crops, flips)
                    return self._emit(plan, self.offset + config.batch_size)
                self.phase, self.offset = EVAL, 0
            if self.offset < len(data.test_y):
                stop = min(self.offset + config.eval_batch_size, len(data.test_y))
                return self._emit(MicrobatchPlan(self.index, EVAL, self.epoch, torch.arange(self.offset, stop)), stop)
            self.epoch, self.phase, self.offset, self.order = self.epoch + 1, TRAIN, 0, None
        raise StopIteration

    def _emit(self, plan: MicrobatchPlan, offset: int) -> MicrobatchPlan:
        """Hand out ``plan``; the phase's next sample is at ``offset``."""
        self.index, self.offset = self.index + 1, offset
        return plan

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

    @property
    def scored_eval_samples(self) -> int:
        """Predictions one pass over the test set scores (sequence data: see SequenceSchedule)."""
        return len(self.dataset.test_y)

    def __len__(self) -> int:
        return self.config.epochs * (self.train_microbatches_per_epoch + self.eval_microbatches_per_pass)

    def __iter__(self) -> Iterator[MicrobatchPlan]:
        return ScheduleStream(self)

    def stream(self, position: StreamPosition | None = None) -> ScheduleStream:
        """The stream from ``position`` (a checkpoint's), or from the start."""
        return ScheduleStream(self, position)

    def read(self, plan: MicrobatchPlan) -> Microbatch:
        """The microbatch of ``plan``, made on the host (what the first stage makes on its device)."""
        if self._host is None:
            self._host = DataSource(self.dataset, "cpu")
        return self._host.read(plan)

    def microbatches(self, position: StreamPosition | None = None) -> Iterator[Microbatch]:
        """The stream's microbatches made on the host, from ``position`` or the start (what a stage
        receives; for tests and tools that drive a Stage by hand)."""
        return map(self.read, self.stream(position))

    def inputs_of(self, plan: MicrobatchPlan) -> torch.Tensor:
        """The inputs of ``plan``, augmented, on the host (for a rule's feedback loop)."""
        return self.read(plan).inputs
