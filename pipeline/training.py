"""The training loop, shared by the launcher and the benchmarks: feed the stream of microbatches
to an executor, collect predictions in order, and let observers (progress bar, metrics, ...)
decide for themselves when it is time to act."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from forwardflow.pipeline.device import host_read
from forwardflow.pipeline.messages import EVAL, Prediction, StageStats
from forwardflow.pipeline.rules.base import Feedback
from forwardflow.pipeline.runner import Executor
from forwardflow.pipeline.schedule import MicrobatchSchedule
from forwardflow.pipeline.targets import ACCURACY, Metric

if TYPE_CHECKING:
    from forwardflow.pipeline.loop import Durability

COMPLETED, INTERRUPTED = "completed", "interrupted"


@dataclass
class EvalResult:
    """The test score after an epoch (accuracy, or the mean squared error of a real-valued
    target: the task's ``Metric``), from the evaluation microbatches that followed it."""

    epoch: int
    scores: dict[str, float]  # per predictor key (Rule.predictors)
    primary: str  # the key of the rule's own prediction
    train_samples_seen: int
    wall_s: float
    metric: Metric = ACCURACY

    @property
    def score(self) -> float:
        """The rule's own prediction: what a run's test score reports."""
        return self.scores[self.primary]

    @property
    def accuracies(self) -> dict[str, float]:
        """The scores of a classification task."""
        if self.metric is not ACCURACY:
            raise ValueError(f"the task is scored by {self.metric.label}, not accuracy")
        return self.scores

    @property
    def accuracy(self) -> float:
        return self.accuracies[self.primary]


@dataclass
class Progress:
    train_samples_done: int = 0
    train_samples_total: int = 0
    microbatches_done: int = 0
    microbatches_total: int = 0
    started: float = field(default_factory=time.perf_counter)
    latest: EvalResult | None = None
    restarts: int = 0  # lost stages recovered so far

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

    def on_rewind(self, progress: Progress, reason: str) -> None:
        """The run went back to a checkpoint (``reason``: a resumed run, or the stage that was
        lost): ``progress`` is as it was there, and the microbatches after it come again."""


class ScoreTracker:
    """Scores the evaluation predictions the task scores (a sequence's last step, for a many-to-one
    task) until a whole pass over the test set is in."""

    def __init__(self, test_size: int, primary: str, metric: Metric = ACCURACY):
        self.test_size = test_size
        self.primary = primary
        self.metric = metric
        self._reset()

    def _reset(self) -> None:
        self.seen = 0
        self.totals: dict[str, torch.Tensor] = {}

    def observe(self, prediction: Prediction, progress: Progress) -> EvalResult | None:
        if prediction.phase != EVAL or not prediction.scored:
            return None
        for key, predicted in prediction.outputs.items():
            # Summed where the prediction is (a GPU in the sequential runner): no host read per
            # microbatch; the pass's totals are read once, when it is complete.
            total = self.metric.total(predicted, prediction.labels)
            self.totals[key] = total if key not in self.totals else self.totals[key] + total
        self.seen += prediction.size
        if self.seen < self.test_size:
            return None
        totals = self._read_totals()
        result = EvalResult(
            epoch=prediction.epoch,
            scores={key: total / self.seen for key, total in totals.items()},
            primary=self.primary,
            train_samples_seen=progress.train_samples_done,
            wall_s=progress.elapsed_s,
            metric=self.metric,
        )
        self._reset()
        return result

    def _read_totals(self) -> dict[str, float]:
        with host_read():
            return {key: float(total) for key, total in self.totals.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "totals": self._read_totals()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]
        self.totals = {key: torch.tensor(total, dtype=torch.float64) for key, total in state["totals"].items()}


@dataclass
class RunResult:
    evaluations: list[EvalResult]
    wall_s: float
    train_samples: int
    stages: list[StageStats]
    weights: list[dict[str, torch.Tensor]]
    status: str = COMPLETED  # or INTERRUPTED: stopped by a signal, at a checkpoint
    restarts: int = 0  # lost stages recovered
    checkpoint: str | None = None  # the newest complete checkpoint's folder
    stop_reason: str | None = None  # what stopped an interrupted run (SIGINT, SIGTERM)

    @property
    def train_samples_per_s(self) -> float:
        return self.train_samples / max(self.wall_s, 1e-9)


def train(
    schedule: MicrobatchSchedule,
    executor: Executor,
    primary: str,
    observers: Sequence[RunObserver] = (),
    feedback: Feedback | None = None,
    durability: Durability | None = None,
    metric: Metric = ACCURACY,
) -> RunResult:
    """Feed the stream to ``executor`` and collect its predictions in order. ``primary``: the key
    of the rule's own prediction; ``feedback``: the rule's loop from the output back to the front
    of the pipeline, if any (``Rule.make_feedback``); ``durability``: checkpoints, recovery of a
    lost stage, the stop request, the checkpoint to resume from; ``metric``: how the task scores
    predictions. Called by ``launch.build.Run``, which wires all of them from the config and the data."""
    from forwardflow.pipeline.loop import TrainingLoop  # the loop needs this module's types

    return TrainingLoop(schedule, executor, primary, observers, feedback or Feedback(), durability, metric).run()
