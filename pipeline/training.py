"""The training loop, shared by the launcher and the benchmarks: feed the stream of microbatches
to an executor, collect predictions in order, and let observers (progress bar, metrics, ...)
decide for themselves when it is time to act."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from forwardflow.pipeline.device import host_read
from forwardflow.pipeline.messages import EVAL, Prediction, StageStats
from forwardflow.pipeline.rules.base import Feedback
from forwardflow.pipeline.runner import Executor
from forwardflow.pipeline.schedule import MicrobatchSchedule


@dataclass
class EvalResult:
    """Test accuracy after an epoch, from the evaluation microbatches that followed it."""

    epoch: int
    accuracies: dict[str, float]  # per predictor key (Rule.predictors)
    primary: str  # the key of the rule's own prediction
    train_samples_seen: int
    wall_s: float

    @property
    def accuracy(self) -> float:
        """The rule's own prediction: what a run's test accuracy reports."""
        return self.accuracies[self.primary]


@dataclass
class Progress:
    train_samples_done: int = 0
    train_samples_total: int = 0
    microbatches_done: int = 0
    microbatches_total: int = 0
    started: float = field(default_factory=time.perf_counter)
    latest: EvalResult | None = None

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def samples_per_s(self) -> float:
        return self.train_samples_done / max(self.elapsed_s, 1e-9)


class RunObserver:
    """Hooks with no-op defaults; each observer keeps its own cadence."""

    def after_submit(self, executor: Executor, progress: Progress) -> None: ...

    def on_prediction(self, prediction: Prediction, progress: Progress) -> None: ...

    def on_evaluation(self, result: EvalResult, progress: Progress) -> None: ...

    def on_end(self, result: RunResult) -> None: ...


class AccuracyTracker:
    """Counts correct evaluation predictions until a whole pass over the test set is in."""

    def __init__(self, test_size: int, primary: str):
        self.test_size = test_size
        self.primary = primary
        self._reset()

    def _reset(self) -> None:
        self.seen = 0
        self.correct: dict[str, torch.Tensor] = {}

    def observe(self, prediction: Prediction, progress: Progress) -> EvalResult | None:
        if prediction.phase != EVAL:
            return None
        for key, predicted in prediction.outputs.items():
            # Counted where the prediction is (a GPU in the sequential runner): no host read per
            # microbatch; the pass's counts are read once, when it is complete.
            hits = (predicted == prediction.labels).sum()
            self.correct[key] = hits if key not in self.correct else self.correct[key] + hits
        self.seen += prediction.size
        if self.seen < self.test_size:
            return None
        keys = list(self.correct)
        with host_read():
            counts = torch.stack([self.correct[key] for key in keys]).tolist() if keys else []
        result = EvalResult(
            epoch=prediction.epoch,
            accuracies={key: count / self.seen for key, count in zip(keys, counts)},
            primary=self.primary,
            train_samples_seen=progress.train_samples_done,
            wall_s=progress.elapsed_s,
        )
        self._reset()
        return result


@dataclass
class RunResult:
    evaluations: list[EvalResult]
    wall_s: float
    train_samples: int
    stages: list[StageStats]
    weights: list[dict[str, torch.Tensor]]

    @property
    def train_samples_per_s(self) -> float:
        return self.train_samples / max(self.wall_s, 1e-9)


def train(
    schedule: MicrobatchSchedule,
    executor: Executor,
    primary: str,
    observers: Sequence[RunObserver] = (),
    feedback: Feedback | None = None,
) -> RunResult:
    """Feed the stream to ``executor`` and collect its predictions in order. ``primary``: the key
    of the rule's own prediction; ``feedback``: the rule's loop from the output back to the front
    of the pipeline, if any (``Rule.make_feedback``). Called by ``launch.build.Run``, which wires
    both from the rule."""
    feedback = feedback or Feedback()
    progress = Progress(train_samples_total=schedule.total_train_samples, microbatches_total=len(schedule))
    tracker = AccuracyTracker(len(schedule.dataset.test_y), primary)
    evaluations: list[EvalResult] = []

    def handle(prediction: Prediction) -> None:
        feedback.on_prediction(prediction)
        progress.microbatches_done += 1
        if prediction.phase != EVAL:
            progress.train_samples_done += prediction.size
        for observer in observers:
            observer.on_prediction(prediction, progress)
        result = tracker.observe(prediction, progress)
        if result is not None:
            evaluations.append(result)
            progress.latest = result
            for observer in observers:
                observer.on_evaluation(result, progress)

    for plan in schedule:
        if not feedback.ready(plan):  # only when the feedback delay is shorter than the window
            for prediction in executor.completed(wait=True):
                handle(prediction)
        # Returns at once on Ray; blocks only when the window is full.
        executor.submit(feedback.attach(plan, schedule.inputs_of))
        for prediction in executor.completed():
            handle(prediction)
        for observer in observers:
            observer.after_submit(executor, progress)
    for prediction in executor.completed(wait=True):
        handle(prediction)
    wall_s = progress.elapsed_s
    result = RunResult(
        evaluations=evaluations,
        wall_s=wall_s,
        train_samples=progress.train_samples_done,
        stages=executor.snapshots(),
        weights=executor.state_dicts(),
    )
    for observer in observers:
        observer.on_end(result)
    return result
