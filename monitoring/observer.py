"""The run observer that collects metrics: at its own cadence (wall clock, default every second)
it picks up the stages' latest batched statistics (``Executor.poll_snapshots``, which never
waits for the pipeline) and the driver's view of the pipeline, and hands one record to the
Prometheus exporter and to the metrics log. Nothing here runs per microbatch except a clock read
in ``after_submit`` and an attribute store in ``on_prediction``."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwardflow.monitoring.records import (
    END,
    ERROR,
    EVALUATION,
    NON_FINITE_LOSS,
    PROGRESS,
    MetricsLog,
    RunInfo,
    RunRecord,
    stage_record,
)
from forwardflow.pipeline.config import MonitoringConfig
from forwardflow.pipeline.messages import NonFiniteLossError, Prediction, StageStats
from forwardflow.pipeline.runner import Executor
from forwardflow.pipeline.targets import ACCURACY, MSE
from forwardflow.pipeline.training import EvalResult, Progress, RunObserver, RunResult
from forwardflow.pipeline.validation import ConfigError

LINGER_POLL_S = 0.1  # how soon a signal ends --metrics-linger

if TYPE_CHECKING:
    from forwardflow.monitoring.exporter import PrometheusExporter


@dataclass(frozen=True)
class MetricsConfig:
    """What the observer needs: the run's monitoring settings (checked in the config tree) and
    facts known once the stages are placed."""

    settings: MonitoringConfig
    info: RunInfo
    devices: tuple[str, ...]  # each stage's device label
    out: str | None = None  # where metrics.jsonl goes; None: no log


def error_kind(error: BaseException) -> str:
    """The ``kind`` label of forwardflow_errors_total: a non-finite loss, or the error's class
    (LossExplodedError, WriteError, StageLostError, ...)."""
    return NON_FINITE_LOSS if isinstance(error, NonFiniteLossError) else type(error).__name__


def cannot_serve(settings: MonitoringConfig, error: OSError) -> ConfigError:
    return settings.error(
        "metrics_port", f"cannot serve on {settings.metrics_host}:{settings.metrics_port} ({error.strerror or error})"
    )


def check_endpoint(settings: MonitoringConfig) -> None:
    """ConfigError unless --metrics-host:--metrics-port can be served, checked before any stage
    starts by binding it once (the endpoint itself binds it again once the stages are placed)."""
    if not settings.metrics_port:
        return
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            settings.metrics_host, settings.metrics_port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
            probe.bind(address)
    except OSError as error:  # in use, not an address of this machine, or no such host
        raise cannot_serve(settings, error) from None


class MetricsObserver(RunObserver):
    def __init__(self, config: MetricsConfig):
        self.config = config
        settings = config.settings
        self.exporter: PrometheusExporter | None = None
        if settings.metrics_port:
            # prometheus_client only when an endpoint is asked for: a run without one (the device
            # check on a machine with torch and numpy only) does not need it.
            from forwardflow.monitoring.exporter import PrometheusExporter

            self.exporter = PrometheusExporter(config.info, list(config.devices))
        self.log = MetricsLog(config.out) if config.out else None
        self.port: int | None = None  # the endpoint's port once it serves
        if self.exporter is not None:
            try:
                self.port = self.exporter.serve(settings.metrics_host, settings.metrics_port)
            except OSError as error:  # in use, or not an address of this machine
                raise cannot_serve(settings, error) from None
        self._due = 0.0
        self._progress: Progress | None = None
        self._previous: dict[int, StageStats] = {}
        self._train_accuracy: dict[int, float] = {}  # per stage, the latest interval's
        self._last_elapsed = 0.0
        self._last_samples = 0
        self._epoch = 0
        self._in_flight = 0
        self._backlog = [0] * config.info.stages
        self._scores: dict[str, dict[str, float]] = {}  # RunRecord field of the metric -> per predictor
        self._errors = {NON_FINITE_LOSS: 0}

    # --- RunObserver hooks ---

    def after_submit(self, executor: Executor, progress: Progress) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.config.settings.metrics_interval
        self._progress = progress
        snapshots = executor.poll_snapshots()
        self._backlog = executor.stage_backlog()
        self._in_flight = executor.in_flight
        self._collect(PROGRESS, snapshots)

    def on_prediction(self, prediction: Prediction, progress: Progress) -> None:
        self._epoch = prediction.epoch + 1

    def on_evaluation(self, result: EvalResult, progress: Progress) -> None:
        self._progress = progress
        self._scores.setdefault(result.metric.record_field, {}).update(result.scores)
        self._collect(EVALUATION, None)

    def on_end(self, result: RunResult) -> None:
        self._in_flight = 0
        self._backlog = [0] * self.config.info.stages
        self._collect(END, result.stages)

    def on_rewind(self, progress: Progress, reason: str) -> None:
        """Back to a checkpoint: the log loses the records of the microbatches that come again,
        so that it never counts one twice; the next interval values start from the restored
        counters."""
        self._progress = progress
        self._previous.clear()
        self._last_elapsed, self._last_samples = progress.elapsed_s, progress.train_samples_done
        if self.log is not None:
            self.log.rewind(self.config.info.run_id, progress.microbatches_done)

    def on_error(self, error: BaseException) -> None:
        """Not a training-loop hook: the launcher calls it when the run stops on an error."""
        kind = error_kind(error)
        self._errors[kind] = self._errors.get(kind, 0) + 1
        self._collect(ERROR, None)

    # ---

    def _collect(self, kind: str, snapshots: list[StageStats] | None) -> None:
        progress = self._progress or Progress()
        stages = None
        if snapshots is not None:
            stages = []
            for stats in snapshots:
                device = self.config.devices[stats.stage]
                entry = stage_record(stats, self._previous.get(stats.stage), device)
                # An interval without a scored training microbatch (evaluation only; the steps of a
                # sequence before its last) has no accuracy of its own: the latest one stands, as
                # the loss's does, so that the series has no gaps.
                if entry.train_accuracy is None:
                    entry.train_accuracy = self._train_accuracy.get(stats.stage)
                else:
                    self._train_accuracy[stats.stage] = entry.train_accuracy
                stages.append(entry)
                self._previous[stats.stage] = stats
        elapsed = progress.elapsed_s
        samples = progress.train_samples_done
        interval = elapsed - self._last_elapsed
        rate = (samples - self._last_samples) / interval if interval > 0 else 0.0
        if kind != EVALUATION:  # an evaluation line is an event, not a step of the rate's clock
            self._last_elapsed, self._last_samples = elapsed, samples
        done = progress.microbatches_done / progress.microbatches_total if progress.microbatches_total else 0.0
        eta = elapsed * (1 - done) / done if done > 0 else None
        record = RunRecord(
            kind=kind,
            run_id=self.config.info.run_id,
            time=time.time(),
            elapsed_s=elapsed,
            train_samples=samples,
            samples_per_s=rate,
            microbatches_done=progress.microbatches_done,
            microbatches_total=progress.microbatches_total,
            epoch=self._epoch,
            eta_s=eta,
            in_flight=self._in_flight,
            backlog=list(self._backlog),
            test_accuracy=dict(self._scores.get(ACCURACY.record_field, {})),
            test_mse=dict(self._scores.get(MSE.record_field, {})),
            errors=dict(self._errors),
            restarts=progress.restarts,
            stages=stages,
        )
        if self.exporter is not None:
            self.exporter.update(record)
        if self.log is not None:
            self.log.append(record)

    @property
    def url(self) -> str | None:
        """Where the endpoint serves, once it does."""
        host = self.config.settings.metrics_host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
        return None if self.port is None else f"http://{host}:{self.port}/metrics"

    def close(self, cut_short: Callable[[], bool] = lambda: False) -> None:
        """Stop serving, after ``--metrics-linger`` so that Prometheus can scrape the final values,
        or as soon as ``cut_short()`` (a signal: the user wants the process to end)."""
        if self.exporter is None:
            return
        linger = self.config.settings.metrics_linger
        if linger > 0:
            print(
                f"forwardflow: serving the final metrics on {self.url} for {linger:g} s (--metrics-linger)",
                file=sys.stderr,
            )
            ends = time.monotonic() + linger
            while not cut_short() and time.monotonic() < ends:
                time.sleep(min(LINGER_POLL_S, max(0.0, ends - time.monotonic())))
        self.exporter.stop()
