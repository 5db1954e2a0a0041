"""Helpers for the durability tests: observers that stop a run or kill a stage's process at a
given microbatch, and a run resumed from its directory the way ``--resume`` does it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from forwardflow.launch.build import Run, build_run
from forwardflow.launch.resume import resumed_config
from forwardflow.pipeline.messages import Prediction
from forwardflow.pipeline.presets import synthetic_small
from forwardflow.pipeline.training import Progress, RunObserver, RunResult


class StopAt(RunObserver):
    """Asks the run to stop (as a signal would) once ``count`` predictions are in."""

    def __init__(self, run: Run, count: int):
        self.run, self.count = run, count

    def on_prediction(self, prediction: Prediction, progress: Progress) -> None:
        if progress.microbatches_done == self.count:
            self.run.stop.request("SIGTERM")


class KillStage(RunObserver):
    """Kills stage ``stage``'s actor process (SIGKILL, by the pid the actor reports) once
    ``count`` predictions are in, ``times`` times in all."""

    def __init__(self, run: Run, stage: int, count: int, times: int = 1):
        self.run, self.stage, self.count, self.times = run, stage, count, times
        self.killed: list[int] = []
        self.rewinds: list[tuple[int, str]] = []  # (microbatches done after the rewind, reason)
        self.done_before: list[int] = []
        self.latest = 0

    def on_prediction(self, prediction: Prediction, progress: Progress) -> None:
        if progress.microbatches_done == self.count and len(self.killed) < self.times:
            assert self.run.executor is not None
            pid = int(self.run.executor.locations[self.stage]["pid"])  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
        self.latest = progress.microbatches_done

    def on_rewind(self, progress: Progress, reason: str) -> None:
        self.done_before.append(self.latest)
        self.rewinds.append((progress.microbatches_done, reason))


def train_and_finish(run: Run) -> RunResult:
    with run:
        result = run.train()
    run.finish(result)
    return result


def resume(out: Path, **execution) -> RunResult:
    """The run in ``out`` continued from its newest checkpoint (``execution``: e.g. another executor)."""
    config = resumed_config(str(out), synthetic_small())
    if execution:
        from helpers import tweak

        config = tweak(config, execution=execution)
    return train_and_finish(build_run(config))


def log_counts(out: Path) -> list[int]:
    """``microbatches_done`` of every line of the run's metrics log, in order."""
    return [json.loads(line)["microbatches_done"] for line in (out / "metrics.jsonl").read_text().splitlines()]
