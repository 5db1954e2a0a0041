"""The training loop, shared by the launcher and the benchmarks: feed the stream of microbatches
to an executor, collect predictions in order, and let observers (progress bar, metrics, ...)
decide for themselves when it is time to act."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.messages import EVAL, Prediction, StageStats
from pipeline.rules.base import Feedback
from pipeline.runner import Executor
from pipeline.schedule import MicrobatchSchedule


@dataclass
class EvalResult:
    """Test accuracy after an epoch, from the evaluation microbatches that followed it."""

    epoch: int
    accuracy: float | None  # nearest-target prediction (None for rules without targets)
    accuracy_head: float | None  # the linear output layer
    extra: dict[str, float]  # rule-specific predictions (e.g. forward-forward label scanning)
    train_samples_seen: int
    wall_s: float

    @property
    def best_accuracy(self) -> float:
        """The rule's own prediction: the nearest target, else forward-forward's label scan, else
        the output head."""
        if self.accuracy is not None:
            return self.accuracy
        return self.extra.get("scan", self.accuracy_head or 0.0)


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

    def on_end(self, result: "RunResult") -> None: ...


class AccuracyTracker:
    """Counts correct evaluation predictions until a whole pass over the test set is in."""

    def __init__(self, test_size: int):
        self.test_size = test_size
        self._reset()

    def _reset(self) -> None:
        self.seen = 0
        self.correct: dict[str, int] = {}

    def observe(self, prediction: Prediction, progress: Progress) -> EvalResult | None:
        if prediction.phase != EVAL:
            return None
        labels = prediction.labels
        outputs = {"nearest_target": prediction.nearest_target, "head": prediction.head, **prediction.extra}
        for name, predicted in outputs.items():
            if predicted is not None:
                self.correct[name] = self.correct.get(name, 0) + int((predicted == labels).sum())
        self.seen += prediction.size
        if self.seen < self.test_size:
            return None
        fractions = {name: hits / self.seen for name, hits in self.correct.items()}
        result = EvalResult(epoch=prediction.epoch, accuracy=fractions.pop("nearest_target", None),
                            accuracy_head=fractions.pop("head", None), extra=fractions,
                            train_samples_seen=progress.train_samples_done, wall_s=progress.elapsed_s)
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


def train(schedule: MicrobatchSchedule, executor: Executor, observers: list[RunObserver] = (),
          feedback: Feedback | None = None) -> RunResult:
    """``feedback``: the rule's loop from the output back to the front of the pipeline, if any
    (see ``pipeline.rules.registry.make_feedback``)."""
    feedback = feedback or Feedback()
    progress = Progress(train_samples_total=schedule.total_train_samples, microbatches_total=len(schedule))
    tracker = AccuracyTracker(len(schedule.dataset.test_y))
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

    for mb in schedule:
        if not feedback.ready(mb):  # only when the feedback delay is shorter than the window
            for prediction in executor.completed(wait=True):
                handle(prediction)
        executor.submit(feedback.attach(mb))  # returns at once on Ray; blocks only when the window is full
        for prediction in executor.completed():
            handle(prediction)
        for observer in observers:
            observer.after_submit(executor, progress)
    for prediction in executor.completed(wait=True):
        handle(prediction)
    wall_s = progress.elapsed_s
    result = RunResult(evaluations=evaluations, wall_s=wall_s, train_samples=progress.train_samples_done,
                       stages=executor.snapshots(), weights=executor.state_dicts())
    for observer in observers:
        observer.on_end(result)
    return result
