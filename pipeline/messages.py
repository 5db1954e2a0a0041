"""What flows between stages and back to the driver: named dataclasses, never positional tuples."""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

TRAIN = "train"
EVAL = "eval"
# Upper bounds (seconds) of the step-time histogram: from tens of microseconds (a tiny layer on a
# GPU) to seconds (a conv stage on a CPU).
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class TimeStep:
    """Where a microbatch of sequence data is in time: step ``step`` (0-based) of sequences of
    ``length`` steps. The stream carries one time step of a batch of sequences per microbatch, the
    steps of one batch in order; a stage starts a sequence's state afresh at step 0.

    ``scored``: this step's prediction is one the task scores (a many-to-one task: the last step;
    many-to-many: every step). ``supervised``: the target applies at this step, so a stage learns
    from it (``--loss-steps``). ``update``: a stage applies the gradients it has gathered after this
    step (``--update-every``; always at the last step)."""

    step: int
    length: int
    scored: bool = True
    supervised: bool = True
    update: bool = True

    @property
    def last(self) -> bool:
        return self.step == self.length - 1


def to_wire(value):
    """A tensor as a NumPy array (Ray stores those out of band; pickling a torch tensor copies it
    through torch's storage serialiser), bfloat16 (which NumPy lacks) as its int16 bits."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype == torch.bfloat16:
        return BFloat16Bits(value.view(torch.int16).numpy())
    return value.numpy()


@dataclass(frozen=True)
class BFloat16Bits:
    bits: np.ndarray


def from_wire(value):
    with warnings.catch_warnings():
        # Arrays read from the object store are read-only; the tensors are views of them. Stages
        # never write into their inputs (every block and loss makes new tensors), and a copy to a
        # GPU makes a private copy anyway.
        warnings.simplefilter("ignore", UserWarning)
        if isinstance(value, BFloat16Bits):
            return torch.from_numpy(value.bits).view(torch.bfloat16)
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


@dataclass
class MicrobatchPlan:
    """What the schedule decides for one microbatch, and all the driver sends for it: its place in
    the stream, which samples (rows of the training or the test set, by ``phase``) and how they
    are augmented. The first stage's data source (``pipeline/source.py``), which holds the dataset
    on that stage's device, turns it into a :class:`Microbatch`, so the samples themselves never
    travel per microbatch."""

    index: int  # position in the one stream of training and evaluation microbatches
    phase: str  # TRAIN (rows of the training set) or EVAL (rows of the test set)
    epoch: int
    rows: torch.Tensor  # int64 sample numbers
    crops: torch.Tensor | None = None  # augmentation: (B, 2) offsets (row, column) into the padded image
    flips: torch.Tensor | None = None  # augmentation: (B,) bool, flip horizontally
    # A rule's further input rows, made by the driver (error forward-propagation's replay); the
    # data source hands them on as the microbatch's ``context``.
    context: torch.Tensor | None = None
    time: TimeStep | None = None  # sequence data: the time step of the rows' sequences to read

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def __reduce__(self):
        return (_rebuild_plan, tuple(to_wire(getattr(self, f.name)) for f in fields(self)))


def _rebuild_plan(*values) -> MicrobatchPlan:
    return MicrobatchPlan(*[from_wire(v) for v in values])


@dataclass
class Microbatch:
    """A microbatch as one stage hands it to the next.

    ``inputs`` is ``h_{l-1}`` (B rows). ``targets`` is ``t_{l-1}`` for the K classes (K rows, not B:
    a microbatch holds at most K distinct labels, so the target path carries one row per class and
    the loss expands it by label). It is ``None`` before the first stage has projected the labels,
    and for rules without a target path. ``context`` is a rule's further rows, carried through the
    same blocks as the inputs (error forward-propagation: the replayed microbatch, clean and
    error-modulated; forward-forward: the positive and negative passes, or at evaluation one copy
    of each sample per label). ``extra`` holds per-sample values a rule accumulates stage by stage
    without passing them through the blocks (forward-forward: the goodness summed so far).
    """

    index: int  # position in the one stream of training and evaluation microbatches
    phase: str  # TRAIN or EVAL
    epoch: int
    inputs: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None = None
    context: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    time: TimeStep | None = None  # sequence data: which time step this is; None: not a sequence

    @property
    def size(self) -> int:
        return self.inputs.shape[0]

    @property
    def ends_sample(self) -> bool:
        """The microbatch completes its samples: always, except before a sequence's last step."""
        return self.time is None or self.time.last

    def to(self, device: torch.device | str) -> Microbatch:
        # A copy to a GPU may be non-blocking: the first kernel that reads the tensor is ordered
        # after the copy on the same stream. A copy to the host must block, or the tensor could be
        # serialised for the next actor before its data has arrived.
        device = torch.device(device)
        if all(tensor.device == device for tensor in self._tensors()):
            return self  # already there (the sequential runner): no copy, no new message
        non_blocking = device.type == "cuda"
        return self.map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def __reduce__(self):
        # Pickled as NumPy arrays: Ray stores those out of band and a receiving actor maps them
        # straight from the shared-memory object store, where pickling torch tensors copies them
        # through torch's storage serialiser (measured: ~2x slower per actor hop at 2 MB).
        values = [getattr(self, f.name) for f in fields(self)]
        return (_rebuild_microbatch, tuple(_wire_field(v) for v in values))

    def map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> Microbatch:
        """The same microbatch with ``move`` applied to each of its tensors."""
        return replace(
            self,
            inputs=move(self.inputs),
            labels=move(self.labels),
            targets=None if self.targets is None else move(self.targets),
            context=None if self.context is None else move(self.context),
            extra={name: move(tensor) for name, tensor in self.extra.items()},
        )

    def _tensors(self) -> list[torch.Tensor]:
        optional = (self.targets, self.context, *self.extra.values())
        return [self.inputs, self.labels, *(tensor for tensor in optional if tensor is not None)]

    def detached(self) -> Microbatch:
        if not any(tensor.requires_grad for tensor in self._tensors()):
            return self  # nothing a gradient could flow back into (every hand-on): no new message
        return self.map(torch.Tensor.detach)

    def handed_on(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None,
        context: torch.Tensor | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> Microbatch:
        """The next stage's input: detached, so that no gradient can cross the stage boundary.
        A rule that carries ``context`` or ``extra`` passes its stage's own; left out, the received
        ones go on unchanged."""
        return replace(
            self,
            inputs=inputs.detach(),
            targets=None if targets is None else targets.detach(),
            context=self.context if context is None else context.detach(),
            extra=self.extra if extra is None else {k: v.detach() for k, v in extra.items()},
        )


def _wire_field(value):
    if isinstance(value, dict):  # ``extra``: a tensor per name
        return {name: to_wire(tensor) for name, tensor in value.items()}
    return to_wire(value)


def _rebuild_microbatch(*values) -> Microbatch:
    rebuilt: list[Any] = [
        {name: from_wire(v) for name, v in value.items()} if isinstance(value, dict) else from_wire(value)
        for value in values
    ]
    return Microbatch(*rebuilt)


@dataclass
class Prediction:
    """What the last stage returns to the driver: class predictions, not activations.

    ``outputs`` maps a predictor's key (``nearest_target``, ``head``, ...) to the predicted class
    of every sample; which keys a rule fills, how reports label them and which one is the rule's
    own prediction is declared by the rule (``Rule.predictors``)."""

    index: int
    phase: str
    epoch: int
    labels: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # Error forward-propagation: the output error (softmax - one-hot) of a training microbatch,
    # which the training loop feeds back to the front of the pipeline.
    feedback: torch.Tensor | None = None
    time: TimeStep | None = None  # the microbatch's time step (sequence data)

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    @property
    def scored(self) -> bool:
        """Whether the task scores this prediction (a many-to-one task: its last step only)."""
        return self.time is None or self.time.scored

    @property
    def ends_sample(self) -> bool:
        return self.time is None or self.time.last

    def cpu(self) -> Prediction:
        return self.map(torch.Tensor.cpu)

    def map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> Prediction:
        """The same prediction with ``move`` applied to each of its tensors."""
        return replace(
            self,
            labels=move(self.labels),
            outputs={key: move(value) for key, value in self.outputs.items()},
            feedback=None if self.feedback is None else move(self.feedback),
        )


@dataclass
class ShardInfo:
    """One stage's part of a checkpoint: its file (a name inside the checkpoint's folder, or a whole
    path when a stage is restored from it), size, SHA-256 and what writing it cost the stage."""

    stage: int
    file: str
    sha256: str
    size: int  # bytes
    seconds: float = 0.0  # the stage's time to serialise and write (or hand over) its shard
    data: bytes | None = None  # the shard itself, when the driver writes it (--shard-writer driver)


@dataclass
class CheckpointMarker:
    """A cut in the stream of microbatches, travelling through the stages like a microbatch.

    Every stage handles its messages in stream order, whatever carries them between stages, so a
    stage that receives the marker has handled exactly the microbatches up to ``after`` and none
    after it: the shard it writes then is its state after microbatch ``after``, and the shards of
    all stages together are one consistent cut, without stopping the pipeline. Each stage adds its
    ShardInfo and hands the marker on; the last one returns it to the driver, in stream order
    among the predictions, and the driver writes the manifest (the cut's own part) last."""

    after: int  # stream index of the last microbatch before the cut
    directory: str  # where the stages write their shards
    stages_write: bool = True  # False: each shard travels in the marker to the driver
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class StageStats:
    """Counters a stage keeps; the driver fetches them in batches, never per microbatch."""

    stage: int
    device: str
    precision: str = "float32"  # of the forward pass and the local loss: bfloat16 where --bf16 is in effect
    samples: int = 0  # training samples processed (sequence data: sequences, counted at their last step)
    eval_samples: int = 0
    microbatches: int = 0
    busy_s: float = 0.0  # time spent computing (forward, local loss, update)
    # Measured by the Ray actor around Stage.step (0 in the sequential runner): wait_s is the gap
    # between the end of one step and the start of the next (starved for input, which also holds
    # Ray's delivery of that input); handoff_s is the copy of the output to the host for the next
    # stage.
    wait_s: float = 0.0
    handoff_s: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    last_loss: float = float("nan")
    train_correct: int = 0  # this stage's own nearest-target hits on training microbatches
    train_scored: int = 0
    # Compute time of the training steps as a cumulative histogram over STEP_BUCKETS (the last
    # entry counts the steps above the largest bound): bounded, whoever collects it and how often.
    step_counts: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))
    step_seconds: float = 0.0
    weight_norm: float = 0.0
    update_norm: float = 0.0
    lr: float = 0.0
    memory_bytes: int = 0  # GPU memory allocated, or process RSS on CPU
    peak_memory_bytes: int = 0
    first_step_at: float = 0.0  # time.time() of the first microbatch
    last_step_at: float = 0.0
    # Sequence data: the time step (1-based) of the latest microbatch and the sequences' length (0
    # for data that is not a sequence), so that a dashboard shows each stage's place in time.
    time_step: int = 0
    sequence_length: int = 0
    updates: int = 0  # optimizer steps applied
    # When the stage first changed its weights: time.time(), and the time step (1-based) of its
    # sequence at which it did (Signal Propagation: 1; backpropagation through time: the last).
    first_update_at: float = 0.0
    first_update_step: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")

    @property
    def steps(self) -> int:
        return sum(self.step_counts)

    def count_step(self, seconds: float) -> None:
        self.step_counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
        self.step_seconds += seconds


class RunStoppedError(RuntimeError):
    """A fault that stops the run for a reason the user can act on (a diverged loss, a failed
    write): reported in one line naming what and where, never as a traceback. A stage raises it and
    every executor passes it on to the driver unchanged. Each subclass keeps its fields when it
    crosses a process boundary (``__reduce__``)."""


class DivergenceError(RunStoppedError):
    """The loss of a stage diverged: training stops before the bad update reaches the weights."""

    def __init__(self, stage: int, microbatch: int, value: float, message: str):
        self.stage, self.microbatch, self.value = stage, microbatch, value
        super().__init__(message)


def _likely_causes(data_ok: bool) -> str:
    if not data_ok:
        return "the microbatch's inputs hold NaN or inf: check the data"
    return "likely causes: a learning rate too high for this model (lower --lr), or extreme values in the data"


class NonFiniteLossError(DivergenceError):
    """A local loss became NaN or inf."""

    def __init__(self, stage: int, microbatch: int, value: float, data_ok: bool = True):
        self.data_ok = data_ok
        super().__init__(
            stage,
            microbatch,
            value,
            f"stage {stage}: local loss is {value} at microbatch {microbatch}; training stopped "
            f"({_likely_causes(data_ok)})",
        )

    def __reduce__(self):  # keeps the fields when the error crosses a process boundary
        return (NonFiniteLossError, (self.stage, self.microbatch, self.value, self.data_ok))


class LossExplodedError(DivergenceError):
    """A local loss far above its running median, or far above where it started."""

    def __init__(self, stage: int, microbatch: int, value: float, reference: float, compared_with: str):
        self.reference, self.compared_with = reference, compared_with
        super().__init__(
            stage,
            microbatch,
            value,
            f"stage {stage}: local loss {value:.4g} at microbatch {microbatch} is {value / reference:.3g} times "
            f"its {compared_with} ({reference:.4g}); training stopped ({_likely_causes(True)})",
        )

    def __reduce__(self):
        return (LossExplodedError, (self.stage, self.microbatch, self.value, self.reference, self.compared_with))


class WriteError(RunStoppedError):
    """A file of the run could not be written (no space left, a file-size limit, no permission)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path} ({reason})")

    def __reduce__(self):
        return (WriteError, (self.path, self.reason))


class StageLostError(RuntimeError):
    """An executor lost a stage (its actor's process or node died). Not a user error: the training
    loop recovers from it (``--max-restarts``)."""

    def __init__(self, stage: int | None, cause: str):
        self.stage, self.cause = stage, cause
        super().__init__(f"stage {'?' if stage is None else stage} was lost: {cause}")

    def __reduce__(self):
        return (StageLostError, (self.stage, self.cause))
