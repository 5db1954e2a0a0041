"""Divergence: a stage's loss that explodes stops the run before the update that caused it spreads.

A loss has exploded when it is more than ``factor`` times the median of the stage's recent losses
(a spike) while above where it started, or more than ``factor`` times where it started (a climb
the running median follows). The median ignores the ordinary spread of losses between
microbatches, however noisy; "where it started" (the first loss read) keeps a loss that has fallen
close to zero from raising an alarm for a value still far below its first ones. Measured on
MNIST and the synthetic set, every rule's loss stays within 3x of both in ordinary training;
``--lr 10`` on the default run jumps 134x at its second microbatch.

The watch works on whatever readings it is given: one per microbatch, or a mean read every few
microbatches when the stage reads its loss periodically; it keeps only a bounded window of them.
Its state is part of the stage's checkpoint, so a resumed run decides exactly as the original.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from forwardflow.pipeline.messages import LossExplodedError

WINDOW = 64  # recent readings the running median is taken over


class LossWatch:
    def __init__(self, factor: float):
        self.factor = factor  # 0: off
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.start: float | None = None  # the first (positive) loss read

    def check(self, value: float, stage: int, microbatch: int) -> None:
        """Raise LossExplodedError if ``value`` exploded; otherwise record it. A loss of 0 has no
        scale to compare with: it is skipped."""
        if value <= 0:
            return
        if self.factor and self.start is not None:
            median = statistics.median(self.recent)
            if value > self.factor * median and value > self.start:
                raise LossExplodedError(stage, microbatch, value, median, "running median")
            if value > self.factor * self.start:
                raise LossExplodedError(stage, microbatch, value, self.start, "first value")
        self.recent.append(value)
        if self.start is None:
            self.start = value

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=WINDOW)
        self.start = state["start"]
