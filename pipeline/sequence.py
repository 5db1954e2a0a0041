"""Sequence data and its stream: images read row by row or pixel by pixel, the adding problem, and
the schedule that turns each batch of sequences into one microbatch per time step.

Tasks (all made from local files or generated; nothing is downloaded):

- ``--sequence rows``: an image as H time steps of its rows (C x W values each): MNIST by rows is
  28 steps of 28 pixels (preset ``mnist-rows``; Fashion-MNIST: ``fashion-rows``).
- ``--sequence pixels``: H x W time steps of one pixel (C values): 784 steps for MNIST (preset
  ``mnist-pixels``); ``--permute`` reads the pixels in one fixed random order.
- ``--dataset adding``: the adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al.
  2015): T steps of two values, a number drawn uniformly from [0, 1] and a marker; exactly two steps
  are marked, one in each half of the sequence, and the target is the sum of the two marked numbers.
  Predicting the mean, 1.0, always gives a mean squared error of Var(u1 + u2) = 1/6 = 0.167 (preset
  ``adding``; ``--sequence-length`` sets T).

The labels above belong to whole sequences (many-to-one): every time step carries the sequence's
label, the task scores the prediction at the last step, and ``--loss-steps`` says whether the
target also applies at the other steps. Labels of shape (N, T) give a label per step
(many-to-many): the target applies, and predictions are scored, at every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from forwardflow.pipeline.config import DataConfig, ScheduleConfig
from forwardflow.pipeline.data import Dataset, load_dataset
from forwardflow.pipeline.messages import MicrobatchPlan, TimeStep
from forwardflow.pipeline.schedule import MicrobatchSchedule, ScheduleStream, StreamPosition
from forwardflow.pipeline.targets import TargetSpec

# The fixed order of --permute: part of the task, the same in every run.
PERMUTATION_SEED = 1234
# The adding problem's training and test sequences (--train-limit / --test-limit take fewer).
ADDING_TRAIN, ADDING_TEST = 20_000, 2_000
# Class-based rules (Signal Propagation) see the adding problem's target, a sum in [0, 2], by its bin.
ADDING_BINS = 10


@dataclass
class SequenceDataset(Dataset):
    """Sequences of shape (N, T, F): T time steps of F values; labels (N,) per sequence or (N, T)
    per step."""

    @property
    def length(self) -> int:
        return self.train_x.shape[1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.train_x.shape[2],)  # one time step: what a stage's first block sees

    @property
    def many_to_one(self) -> bool:
        return self.train_y.dim() == 1


def image_rows(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, C*W): one row of every channel per time step."""
    count, channels, height, width = images.shape
    return images.permute(0, 2, 1, 3).reshape(count, height, channels * width).contiguous()


def image_pixels(images: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C): one pixel per time step, in raster order or in ``order``."""
    pixels = images.flatten(2).transpose(1, 2)
    return (pixels if order is None else pixels[:, order]).contiguous()


def as_sequences(dataset: Dataset, how: str, permute: bool = False) -> SequenceDataset:
    if dataset.train_x.dim() != 4:
        raise ValueError(f"{dataset.name} is not a set of images")
    if how == "rows":
        convert = image_rows
    else:
        height, width = dataset.train_x.shape[2:]
        order = None
        if permute:
            order = torch.randperm(height * width, generator=torch.Generator().manual_seed(PERMUTATION_SEED))

        def convert(images: torch.Tensor) -> torch.Tensor:
            return image_pixels(images, order)

    return SequenceDataset(
        dataset.name,
        convert(dataset.train_x),
        dataset.train_y,
        convert(dataset.test_x),
        dataset.test_y,
        dataset.num_classes,
        dataset.target,
    )


def adding_problem(count: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sequences (count, length, 2) of (number, marker), and their targets (count,)."""
    numbers = torch.rand(count, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (count,), generator=generator)
    second = torch.randint(half, length, (count,), generator=generator)
    markers = torch.zeros(count, length)
    rows = torch.arange(count)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = numbers[rows, first] + numbers[rows, second]
    return torch.stack([numbers, markers], dim=2), targets


def make_adding(seed: int, length: int, train: int = ADDING_TRAIN, test: int = ADDING_TEST) -> SequenceDataset:
    generator = torch.Generator().manual_seed(20_000 + seed)
    train_x, train_y = adding_problem(train, length, generator)
    test_x, test_y = adding_problem(test, length, generator)
    target = TargetSpec(ADDING_BINS, values=(0.0, 2.0))
    return SequenceDataset("adding", train_x, train_y, test_x, test_y, ADDING_BINS, target)


def load_data(config: DataConfig, seed: int = 0) -> Dataset:
    """The run's data: images as they are, images read as sequences, or the adding problem."""
    if config.dataset == "adding":
        dataset: Dataset = make_adding(seed, config.sequence_length)
        if config.train_limit:
            dataset.train_x, dataset.train_y = (
                dataset.train_x[: config.train_limit],
                dataset.train_y[: config.train_limit],
            )
        if config.test_limit:
            dataset.test_x, dataset.test_y = dataset.test_x[: config.test_limit], dataset.test_y[: config.test_limit]
        return dataset
    dataset = load_dataset(config, seed)
    if config.sequence != "none":
        dataset = as_sequences(dataset, config.sequence, config.permute)
    return dataset


class SequenceSchedule(MicrobatchSchedule):
    """The stream for sequence data: each batch of sequences as ``length`` consecutive microbatches,
    one per time step (step 0 first), training batches of an epoch in a seeded shuffle, then the test
    set's, as for images. A stage meets the steps of one batch in order and nothing in between, so
    it can keep the batch's state from one step to the next; the next batch starts at step 0 again.
    """

    dataset: SequenceDataset

    def __init__(self, dataset: SequenceDataset, config: ScheduleConfig, seed: int):
        super().__init__(dataset, config, seed)

    @property
    def length(self) -> int:
        return self.dataset.length

    def __len__(self) -> int:
        return super().__len__() * self.length

    @property
    def total_train_microbatches(self) -> int:
        return super().total_train_microbatches * self.length

    @property
    def scored_eval_samples(self) -> int:
        scored_steps = 1 if self.dataset.many_to_one else self.length
        return len(self.dataset.test_y) * scored_steps

    def time_step(self, step: int) -> TimeStep:
        length, config = self.length, self.config
        last = step == length - 1
        per_step = not self.dataset.many_to_one
        return TimeStep(
            step=step,
            length=length,
            scored=per_step or last,
            supervised=per_step or last or config.loss_steps == "every",
            update=last or (step + 1) % config.update_every == 0,
        )

    def __iter__(self) -> Iterator[MicrobatchPlan]:
        return SequenceStream(self)

    def stream(self, position: StreamPosition | None = None) -> SequenceStream:
        """The stream from ``position`` (a checkpoint's, always at a batch boundary), or from the start."""
        return SequenceStream(self, position)


class SequenceStream(ScheduleStream):
    """The image stream's batches, each handed out as its time steps: the batch is drawn (shuffle,
    slicing) exactly as for images, then its ``length`` steps follow one by one with consecutive
    stream indices. A position can be taken only between two batches (``can_cut``): a stage's
    recurrent state is not part of a checkpoint, and it starts afresh at every batch's step 0."""

    schedule: SequenceSchedule

    def __init__(self, schedule: SequenceSchedule, position: StreamPosition | None = None):
        super().__init__(schedule, position)
        self._steps: list[MicrobatchPlan] = []

    @property
    def can_cut(self) -> bool:
        return not self._steps

    def __next__(self) -> MicrobatchPlan:
        if not self._steps:
            super().__next__()  # the next batch: _emit below turns it into its steps
        return self._steps.pop(0)

    def _emit(self, plan: MicrobatchPlan, offset: int) -> MicrobatchPlan:
        schedule = self.schedule
        # The same rows at every step: the data source reads each step's slice of them.
        self._steps = [
            replace(plan, index=plan.index + step, time=schedule.time_step(step)) for step in range(schedule.length)
        ]
        self.index, self.offset = self.index + schedule.length, offset
        return self._steps[0]

    @property
    def at_epoch_end(self) -> bool:
        return self.can_cut and super().at_epoch_end
