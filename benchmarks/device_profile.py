"""Where a microbatch's time goes, for the device check: a torch profile of a few steady-state
microbatches of a run, in the host's time (wall, and torch's operators within it) and, on a GPU,
the device's. A GPU starved by the host shows as a host time per microbatch far above the device
time, with the operators' share telling how much of the host time is torch's own and how much the
Python around it. The device check takes it in its calibration runs, so that the figures it
reports carry no profiler overhead."""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from forwardflow.pipeline.training import RunObserver

TOP_OPERATORS = 12


class StepProfile(RunObserver):
    """Profiles the ``count`` microbatches of the stream after the first ``start`` (counted as the
    driver submits them, evaluation microbatches included)."""

    def __init__(self, name: str, start: int, count: int):
        self.name, self.start, self.count = name, start, count
        self.cuda = torch.cuda.is_available()
        self.submitted = 0
        self.profiler: profile | None = None
        self.began = 0.0
        self.wall_s = 0.0
        self.profiled = 0
        self.stopped = False
        self.failure = ""

    def after_submit(self, executor, progress) -> None:
        self.submitted += 1
        if self.submitted == self.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            try:
                self.profiler = profile(activities=activities)
                self.profiler.start()
            except Exception as error:  # a profiler that cannot start costs the profile, not the run
                self.profiler, self.failure = None, f"{type(error).__name__}: {error}"
            self.began = time.perf_counter()
        elif self.submitted == self.start + self.count:
            self._stop()

    def on_end(self, result) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.profiler is None or self.stopped:
            return
        if self.cuda:
            torch.cuda.synchronize()  # the device's work of the profiled microbatches is in the window
        self.wall_s = time.perf_counter() - self.began
        self.profiled = self.submitted - self.start  # those submitted after the profiler started
        self.profiler.stop()
        self.stopped = True

    def summary(self) -> str:
        """One line for the device check's report."""
        if self.failure:
            return f"{self.name}: not profiled ({self.failure})"
        if not self.profiled or self.profiler is None:
            return f"{self.name}: not profiled (the run ended within its first {self.start} microbatches)"
        events = self.profiler.key_averages()
        count = self.profiled
        operators_ms = sum(event.self_cpu_time_total for event in events) / 1000  # the profiler counts us
        line = (
            f"{self.name}: {count} microbatches profiled: host {1000 * self.wall_s / count:.2f} ms per microbatch, "
            f"of which torch operators {operators_ms / count:.2f} ms"
        )
        if self.cuda:
            device_ms = sum(event.self_device_time_total for event in events) / 1000
            line += f"; device {device_ms / count:.2f} ms"
        return line

    def tables(self) -> str:
        """The operators with the most host (and device) time, for the profile file."""
        if not self.profiled or self.profiler is None:
            return ""
        events = self.profiler.key_averages()
        parts = [
            f"## {self.summary()}",
            "",
            "```",
            events.table(sort_by="self_cpu_time_total", row_limit=TOP_OPERATORS),
        ]
        if self.cuda:
            parts.append(events.table(sort_by="self_device_time_total", row_limit=TOP_OPERATORS))
        return "\n".join(parts + ["```", ""])
