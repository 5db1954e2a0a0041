"""Divergence: a stage's loss that explodes stops the run before the update that caused it spreads.

A loss has exploded when it is more than ``factor`` times the median of the stage's recent losses
(a spike) while above where it started, or more than ``factor`` times where it started (a climb
the running median follows). The median ignores the ordinary spread of losses between
microbatches, however noisy; "where it started" (the first loss read) keeps a loss that has fallen
close to zero from raising an alarm for a value still far below its first ones. Measured on
MNIST and the synthetic set, every rule's loss stays within 3x of both in ordinary training;
``--lr 10`` on the default run jumps 134x at its second microbatch.

A stage reads its losses every few microbatches (never per microbatch: that would make it wait
for its device), so the watch gives it a limit that its device compares each loss with until the
next read: a loss past it (or NaN, or inf) sets a flag on which the optimizer skips every step, so
the bad update never reaches the weights, and the read names the microbatch. The watch keeps only
a bounded window of readings.
Its state is part of the stage's checkpoint, so a resumed run decides exactly as the original.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

import numpy as np

from forwardflow.pipeline.messages import LossExplodedError

WINDOW = 64  # recent readings the running median is taken over
FLOAT32_MAX = float(np.finfo(np.float32).max)  # no limit (NaN and inf still exceed it)


class LossWatch:
    def __init__(self, factor: float):
        self.factor = factor  # 0: off
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.start: float | None = None  # the first (positive) loss read

    def check(self, value: float, stage: int, microbatch: int) -> None:
        """Raise LossExplodedError if ``value`` exploded; otherwise record it."""
        if abs(value) > self.limit():
            raise self.exploded(value, stage, microbatch)
        self.record(value)

    def limit(self) -> float:
        """The largest |loss| that has not exploded, as a float32 (a stage's device compares each
        loss with it between reads; the host then compares the same values the same way). Both
        conditions above in one bound: ``min(max(factor * median, start), factor * start)``."""
        if not self.factor or self.start is None:
            return FLOAT32_MAX
        median = statistics.median(self.recent)
        bound = min(max(self.factor * median, self.start), self.factor * self.start)
        return float(np.float32(min(bound, FLOAT32_MAX)))

    def exploded(self, value: float, stage: int, microbatch: int) -> LossExplodedError:
        """The error for ``value``, past ``limit()``: a spike against the running median, else a
        climb against where the loss started."""
        assert self.start is not None
        median = statistics.median(self.recent)
        if value > self.factor * median and value > self.start:
            return LossExplodedError(stage, microbatch, value, median, "running median")
        return LossExplodedError(stage, microbatch, value, self.start, "first value")

    def record(self, value: float) -> None:
        """Adds a loss that passed. A loss of 0 or below has no scale to compare with: skipped."""
        if value <= 0:
            return
        self.recent.append(value)
        if self.start is None:
            self.start = value

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=WINDOW)
        self.start = state["start"]
