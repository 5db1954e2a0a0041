"""A progress bar with training samples/s and the latest test score (accuracy, or mean squared
error; tqdm: a maintained library that handles terminals, non-terminals and rate smoothing)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from forwardflow.pipeline.messages import EVAL, Prediction
from forwardflow.pipeline.training import EvalResult, Progress, RunObserver, RunResult


class ProgressBar(RunObserver):
    def __init__(self):
        self.bar: tqdm | None = None

    def on_prediction(self, prediction: Prediction, progress: Progress) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=progress.microbatches_total,
                initial=progress.microbatches_done - 1,  # a resumed run starts where it was
                unit="mb",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        self.bar.update(1)
        if self.bar.n % 10 == 0 or prediction.phase == EVAL:
            latest = progress.latest
            score = "test -" if latest is None else f"test {latest.metric.label} {latest.metric.format(latest.score)}"
            self.bar.set_postfix_str(f"{progress.samples_per_s:,.0f} samples/s, {score}", refresh=False)

    def on_evaluation(self, result: EvalResult, progress: Progress) -> None:
        metric = result.metric
        message = f"epoch {result.epoch + 1}: test {metric.label} {metric.format(result.score)}"
        others = [f"{key} {metric.format(value)}" for key, value in result.scores.items() if key != result.primary]
        if others:
            message += f" ({', '.join(others)})"
        (self.bar.write if self.bar else print)(message, file=sys.stderr)

    def on_rewind(self, progress: Progress, reason: str) -> None:
        if self.bar is not None:
            self.bar.n = progress.microbatches_done
            self.bar.refresh()

    def on_end(self, result: RunResult) -> None:
        if self.bar is not None:
            self.bar.close()
