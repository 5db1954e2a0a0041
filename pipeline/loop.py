"""The training loop, durable: it cuts checkpoints into the stream, stops cleanly when asked (a
signal), recovers from a lost stage, and resumes a run from its newest checkpoint.

A cut is a CheckpointMarker submitted right after microbatch ``after``: it travels through the
stages behind that microbatch, and each stage writes its state after ``after`` (see
``messages.CheckpointMarker``). The pipeline keeps running meanwhile. The driver's own part of the
cut is put together from two moments, because the driver is ahead of the stages on one side and
behind them on the other:

- what depends on submissions (the stream's position and shuffling RNG, what the rule's feedback
  loop attached) is taken when the marker is submitted: nothing after ``after`` was submitted yet;
- what depends on predictions (progress, test accuracy, the errors efp feeds back) is complete
  when the marker comes back: predictions come back in stream order, so by then every one up to
  ``after`` has been handled and none after it.

The feedback loop depends on both, so the cut takes a copy of it at submission, and every
prediction handled until the marker returns is given to that copy as well as to the live loop.
When the marker returns, the copy is exactly the loop of an uninterrupted run after ``after``.

A cut depends only on every stage handling its messages in stream order, which is what the
executors already guarantee for microbatches; not on how the messages travel between stages.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forwardflow.pipeline.checkpoint import Checkpointer, Manifest, read_driver_state, restore_shards
from forwardflow.pipeline.messages import EVAL, TRAIN, CheckpointMarker, Prediction, RunStoppedError, StageLostError
from forwardflow.pipeline.rules.base import Feedback
from forwardflow.pipeline.runner import Executor
from forwardflow.pipeline.schedule import MicrobatchSchedule, StreamPosition
from forwardflow.pipeline.targets import ACCURACY, METRICS, Metric
from forwardflow.pipeline.training import (
    COMPLETED,
    INTERRUPTED,
    EvalResult,
    Progress,
    RunObserver,
    RunResult,
    ScoreTracker,
)


@dataclass
class StopRequest:
    """Set from a signal handler; the loop cuts at the next consistent point and stops."""

    reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


@dataclass
class Durability:
    """What lets a run survive: where and how often checkpoints are cut, how many lost stages are
    recovered, the stop request, and the checkpoint the run resumes from."""

    checkpoints: Checkpointer | None = None
    every: int = 0  # training microbatches between cuts (0: off)
    period_s: float = 0.0  # seconds between cuts (0: off)
    max_restarts: int = 0
    stop: StopRequest = field(default_factory=StopRequest)
    resume: tuple[Path, Manifest] | None = None


class RestartsExhaustedError(RunStoppedError):
    def __init__(self, lost: str, restarts: int, checkpoint: str | None):
        self.lost, self.restarts, self.checkpoint = lost, restarts, checkpoint
        super().__init__(f"{lost}; the run stopped after {restarts} restart(s) (--max-restarts {restarts})")

    def __reduce__(self):
        return (RestartsExhaustedError, (self.lost, self.restarts, self.checkpoint))


@dataclass
class PendingCut:
    after: int
    reason: str
    stream: StreamPosition  # taken at submission
    feedback: Feedback  # a copy taken at submission, given every prediction until the marker returns


class TrainingLoop:
    def __init__(
        self,
        schedule: MicrobatchSchedule,
        executor: Executor,
        primary: str,
        observers: Sequence[RunObserver],
        feedback: Feedback,
        durability: Durability | None,
        metric: Metric = ACCURACY,
    ):
        self.schedule, self.executor, self.observers = schedule, executor, observers
        self.durability = durability or Durability()
        self.initial_feedback = copy.deepcopy(feedback)  # the loop at microbatch 0
        self.feedback = feedback
        self.progress = Progress(train_samples_total=schedule.total_train_samples, microbatches_total=len(schedule))
        self.tracker = ScoreTracker(schedule.scored_eval_samples, primary, metric)
        self.evaluations: list[EvalResult] = []
        self.stream = schedule.stream()
        self.pending: list[PendingCut] = []
        self.last_submitted = self.last_cut = -1  # stream indices
        self.trained_since_cut, self.cut_clock = 0, time.monotonic()
        self.checkpoint: str | None = None  # the newest complete checkpoint's folder
        self.restarts = 0

    # ---------------------------------------------------------------- the run

    def run(self) -> RunResult:
        # A stage lost while the resumed checkpoint is loaded is a restart like any other: the
        # resume is tried again, with the lost actor made anew.
        resume, lost = self.durability.resume, None
        while True:
            try:
                if lost is not None:
                    self._count_restart(lost)
                    if resume is None:  # else the resume below is what goes back
                        self._rewind(str(lost))
                    lost = None
                if resume is not None:
                    elapsed = self._restore(*resume)
                    self.progress.started = time.perf_counter() - elapsed  # the clock goes on from the cut
                    resume = None
                self._feed()
                stages, weights = self.executor.snapshots(), self.executor.state_dicts()
                break
            except StageLostError as error:
                lost = error
        stop = self.durability.stop
        result = RunResult(
            evaluations=self.evaluations,
            wall_s=self.progress.elapsed_s,
            train_samples=self.progress.train_samples_done,
            stages=stages,
            weights=weights,
            status=INTERRUPTED if stop.requested else COMPLETED,
            restarts=self.restarts,
            checkpoint=self.checkpoint,
            stop_reason=stop.reason,
        )
        for observer in self.observers:
            observer.on_end(result)
        return result

    def _feed(self) -> None:
        """Submit the rest of the stream (or up to a stop), cutting where due, and drain."""
        stop = self.durability.stop
        # A cut (and so a stop) waits for a point the stream can continue from exactly: between two
        # batches of sequences, not inside one (a stage's recurrent state is not part of a cut).
        while not (stop.requested and self.stream.can_cut):
            plan = next(self.stream, None)
            if plan is None:
                break
            if not self.feedback.ready(plan):  # only when the feedback delay is shorter than the window
                self._collect(wait=True)
            # Returns at once on Ray; blocks when the window is full.
            self.executor.submit(self.feedback.attach(plan, self.schedule.inputs_of))
            self.last_submitted = plan.index
            self.trained_since_cut += plan.phase == TRAIN
            self._collect()
            for observer in self.observers:
                observer.after_submit(self.executor, self.progress)
            reason = self._cut_due()
            if reason is not None:
                self._cut(reason)
        if stop.requested:
            self._cut("stop")
        self._collect(wait=True)

    def _collect(self, wait: bool = False) -> None:
        for item in self.executor.completed(wait):
            if isinstance(item, CheckpointMarker):
                self._complete(item)
            else:
                self._handle(item)

    def _handle(self, prediction: Prediction) -> None:
        self.feedback.on_prediction(prediction)
        for cut in self.pending:  # every pending cut lacks this prediction, and its marker follows it
            cut.feedback.on_prediction(prediction)
        progress = self.progress
        progress.microbatches_done += 1
        if prediction.phase != EVAL and prediction.ends_sample:  # a sequence counts once, at its end
            progress.train_samples_done += prediction.size
        for observer in self.observers:
            observer.on_prediction(prediction, progress)
        result = self.tracker.observe(prediction, progress)
        if result is not None:
            self.evaluations.append(result)
            progress.latest = result
            for observer in self.observers:
                observer.on_evaluation(result, progress)

    # ---------------------------------------------------------------- cuts

    def _cut_due(self) -> str | None:
        durability = self.durability
        if durability.checkpoints is None or not self.stream.can_cut:
            return None
        if self.stream.at_epoch_end:
            return "epoch"
        if durability.every and self.trained_since_cut >= durability.every:
            return "interval"
        if durability.period_s and time.monotonic() - self.cut_clock >= durability.period_s:
            return "minutes"
        return None

    def _cut(self, reason: str) -> None:
        checkpoints = self.durability.checkpoints
        if checkpoints is None or self.last_submitted == self.last_cut:
            return  # nothing to save, or a cut right here already
        marker = checkpoints.marker(self.last_submitted)
        self.pending.append(PendingCut(marker.after, reason, self.stream.position(), copy.deepcopy(self.feedback)))
        self.executor.submit(marker)
        self.last_cut, self.trained_since_cut, self.cut_clock = self.last_submitted, 0, time.monotonic()
        self._collect()  # the sequential runner has it done already: complete it before going on

    def _complete(self, marker: CheckpointMarker) -> None:
        cut = self.pending.pop(0)
        assert cut.after == marker.after and self.progress.microbatches_done == cut.after + 1, "cut out of order"
        state = {
            "after": cut.after,
            "stream": cut.stream.state_dict(),
            "feedback": cut.feedback.state_dict(),
            "progress": {
                "microbatches_done": self.progress.microbatches_done,
                "train_samples_done": self.progress.train_samples_done,
                "elapsed_s": self.progress.elapsed_s,
            },
            "tracker": self.tracker.state_dict(),
            "evaluations": [
                {**asdict(evaluation), "metric": evaluation.metric.name} for evaluation in self.evaluations
            ],
        }
        assert self.durability.checkpoints is not None
        self.durability.checkpoints.complete(marker, state, cut.reason)
        self.checkpoint = marker.directory

    # ---------------------------------------------------------------- back to a checkpoint

    def _count_restart(self, lost: StageLostError) -> None:
        """A stage was lost: one restart more, or the run stops past --max-restarts."""
        if self.restarts >= self.durability.max_restarts:
            raise RestartsExhaustedError(str(lost), self.durability.max_restarts, self.checkpoint)
        self.restarts += 1
        self.progress.restarts = self.restarts

    def _rewind(self, reason: str) -> None:
        """Every stage and the driver go back to the newest complete checkpoint (or to the start),
        and the microbatches after it are done again."""
        checkpoints = self.durability.checkpoints
        latest = checkpoints.latest() if checkpoints is not None else None
        folder, manifest = latest if latest is not None else (None, None)
        self._restore(folder, manifest, reason=reason)

    def _restore(self, folder: Path | None, manifest: Manifest | None, reason: str = "resumed") -> float:
        """Stages and driver as they were at ``manifest``'s cut (None: the start); returns the run's
        elapsed time there."""
        checkpoints = self.durability.checkpoints
        shards = None
        if folder is not None and manifest is not None:
            shards = restore_shards(folder, manifest, checkpoints is None or checkpoints.stages_write)
        self.executor.restore(shards)
        state = read_driver_state(folder, manifest) if folder is not None and manifest is not None else None
        self._install(state)
        self.checkpoint = None if folder is None else str(folder.absolute())
        for observer in self.observers:
            observer.on_rewind(self.progress, reason)
        return 0.0 if state is None else state["progress"]["elapsed_s"]

    def _install(self, state: dict[str, Any] | None) -> None:
        self.pending = []
        self.feedback = copy.deepcopy(self.initial_feedback)
        progress = self.progress
        if state is None:
            self.stream = self.schedule.stream()
            progress.microbatches_done = progress.train_samples_done = 0
            self.tracker = ScoreTracker(self.tracker.test_size, self.tracker.primary, self.tracker.metric)
            self.evaluations = []
            self.last_submitted = self.last_cut = -1
        else:
            self.stream = self.schedule.stream(StreamPosition(**state["stream"]))
            self.feedback.load_state_dict(state["feedback"])
            progress.microbatches_done = state["progress"]["microbatches_done"]
            progress.train_samples_done = state["progress"]["train_samples_done"]
            self.tracker.load_state_dict(state["tracker"])
            metrics = {metric.name: metric for metric in METRICS}
            self.evaluations = [
                EvalResult(**{**evaluation, "metric": metrics[evaluation["metric"]]})
                for evaluation in state["evaluations"]
            ]
            self.last_submitted = self.last_cut = state["after"]
        progress.latest = self.evaluations[-1] if self.evaluations else None
        self.trained_since_cut, self.cut_clock = 0, time.monotonic()
