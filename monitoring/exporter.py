"""The Prometheus endpoint of one run: a ``prometheus_client`` custom collector over the run's latest
metrics record (``monitoring.records``), served from a registry of its own.

The record already holds every counter as the cumulative value the stages and the driver keep, so a
scrape reports it as it is: nothing is derived from deltas here (the interval values, such as the
loss since the previous collection, are derived once, in ``monitoring.records.stage_record``).

Every metric starts with ``forwardflow_``, carries the run id, and per-stage metrics carry the stage
index and its device. Counters end in ``_total``, units are in the names (``_seconds``, ``_bytes``,
``_ratio``). The README's metrics reference lists each one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.registry import Collector

from forwardflow.monitoring.records import NON_FINITE_LOSS, RunInfo, RunRecord, StageRecord
from forwardflow.pipeline.messages import STEP_BUCKETS
from forwardflow.pipeline.targets import METRICS

__all__ = ["NON_FINITE_LOSS", "PREFIX", "PrometheusExporter", "RunInfo"]
PREFIX = "forwardflow_"
STAGE_LABELS = ["run_id", "stage", "device"]


# (name without prefix, kind, help, StageRecord attribute)
STAGE_SERIES = (
    ("stage_samples", "counter", "Training samples processed by the stage", "samples"),
    ("stage_microbatches", "counter", "Microbatches (training and evaluation) processed by the stage", "microbatches"),
    ("stage_compute_seconds", "counter", "Time the stage spent computing (forward, local loss, update)", "compute_s"),
    ("stage_wait_seconds", "counter", "Time the stage spent between steps, waiting for its input", "wait_s"),
    ("stage_handoff_seconds", "counter", "Time the stage spent handing its output on (copy to the host)", "handoff_s"),
    (
        "stage_loss",
        "gauge",
        "The stage's local loss, mean over the training microbatches since the previous collection",
        "loss",
    ),
    (
        "stage_train_accuracy_ratio",
        "gauge",
        "The stage's own accuracy on training microbatches since the previous collection",
        "train_accuracy",
    ),
    ("stage_learning_rate", "gauge", "The stage optimizer's learning rate", "lr"),
    ("stage_weight_norm", "gauge", "L2 norm of all the stage's weights", "weight_norm"),
    (
        "stage_update_norm",
        "gauge",
        "L2 norm of the change of the stage's weights since the previous collection",
        "update_norm",
    ),
    ("stage_memory_bytes", "gauge", "GPU memory allocated by the stage (process RSS on a CPU)", "memory_bytes"),
    (
        "stage_peak_memory_bytes",
        "gauge",
        "Peak GPU memory allocated by the stage (peak RSS on a CPU)",
        "peak_memory_bytes",
    ),
    (
        "stage_time_step",
        "gauge",
        "Sequence data: the time step (1-based) of the latest microbatch the stage finished (0: not a sequence)",
        "time_step",
    ),
    ("stage_sequence_length", "gauge", "Sequence data: time steps per sequence (0: not a sequence)", "sequence_length"),
    ("stage_updates", "counter", "Optimizer steps the stage applied", "updates"),
)
# (name without prefix, kind, help, RunRecord attribute)
RUN_SERIES = (
    ("train_samples", "counter", "Training samples whose predictions came back to the driver", "train_samples"),
    ("train_samples_per_second", "gauge", "Training samples per second since the previous collection", "samples_per_s"),
    ("epoch", "gauge", "Epoch of the latest completed microbatch (1-based)", "epoch"),
    ("progress_ratio", "gauge", "Fraction of the run's microbatches completed", "progress"),
    ("eta_seconds", "gauge", "Estimated time left", "eta_s"),
    ("microbatches_in_flight", "gauge", "Microbatches submitted whose predictions have not come back", "in_flight"),
    ("actor_restarts", "counter", "Stage actors recreated after a failure", "restarts"),
)


class RunCollector(Collector):
    """Yields the run's metrics from the latest record at every scrape."""

    def __init__(self, info: RunInfo, devices: list[str]):
        self.info = info
        self.devices = devices
        self._lock = threading.Lock()  # scrapes come from the server's thread
        self._record: RunRecord | None = None
        self._stages: dict[int, StageRecord] = {}

    def update(self, record: RunRecord) -> None:
        with self._lock:
            self._record = record
            for stage in record.stages or ():  # a record without stage statistics keeps the last ones
                self._stages[stage.stage] = stage

    def collect(self) -> Iterator:
        with self._lock:
            record, stages = self._record, dict(self._stages)
        run = self.info.run_id
        info = InfoMetricFamily(
            PREFIX + "run", "The run's dataset, rule, model, executor, stages and epochs", labels=["run_id"]
        )
        info.add_metric(
            [run],
            {
                "dataset": self.info.dataset,
                "rule": self.info.rule,
                "model": self.info.model,
                "executor": self.info.executor,
                "stages": str(self.info.stages),
                "epochs": str(self.info.epochs),
            },
        )
        yield info
        for name, kind, documentation, attribute in RUN_SERIES:
            family = _family(kind, name, documentation, ["run_id"])
            value = getattr(record, attribute) if record is not None else 0
            if value is not None:  # an unknown ETA is left out rather than exported as NaN
                family.add_metric([run], value)
            yield family
        yield from self._run_labelled(record)
        for name, kind, documentation, attribute in STAGE_SERIES:
            family = _family(kind, name, documentation, STAGE_LABELS)
            for index, stage in sorted(stages.items()):
                value = getattr(stage, attribute)
                if value is not None:
                    family.add_metric([run, str(index), stage.device], value)
            yield family
        yield self._step_histogram(stages)
        queued = GaugeMetricFamily(
            PREFIX + "stage_queued_microbatches",
            "Microbatches handed to the stage that it has not finished (its input queue plus the one it is computing)",
            labels=STAGE_LABELS,
        )
        for index, depth in enumerate(record.backlog if record is not None else ()):
            queued.add_metric([run, str(index), self.devices[index]], depth)
        yield queued

    def _run_labelled(self, record: RunRecord | None) -> Iterator:
        run = self.info.run_id
        for metric in METRICS:  # each task's metric has a gauge of its own; a run fills one of them
            scores = GaugeMetricFamily(PREFIX + metric.prometheus_name, metric.help, labels=["run_id", "predictor"])
            for predictor, value in (getattr(record, metric.record_field) if record is not None else {}).items():
                scores.add_metric([run, predictor], value)
            yield scores
        errors = CounterMetricFamily(
            PREFIX + "errors", "Errors that stopped the run, per kind", labels=["run_id", "kind"]
        )
        for kind, count in {NON_FINITE_LOSS: 0, **(record.errors if record is not None else {})}.items():
            errors.add_metric([run, kind], count)
        yield errors

    def _step_histogram(self, stages: dict[int, StageRecord]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            PREFIX + "stage_step_seconds", "Compute time of one training microbatch in the stage", labels=STAGE_LABELS
        )
        for index, stage in sorted(stages.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*STEP_BUCKETS, float("inf")), stage.step_counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([self.info.run_id, str(index), stage.device], buckets, stage.step_seconds)
        return family


def _family(kind: str, name: str, documentation: str, labels: list[str]):
    if kind == "counter":  # prometheus_client appends _total to a counter's name itself
        return CounterMetricFamily(PREFIX + name, documentation, labels=labels)
    return GaugeMetricFamily(PREFIX + name, documentation, labels=labels)


class PrometheusExporter:
    """The collector in a registry of the run's own (not the process-wide default), served over
    HTTP from a daemon thread when asked."""

    def __init__(self, info: RunInfo, devices: list[str]):
        self.collector = RunCollector(info, devices)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: Any = None  # the WSGI server, while it serves

    def update(self, record: RunRecord) -> None:
        self.collector.update(record)

    def text(self) -> bytes:
        """The exposition in Prometheus text format, as the endpoint serves it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port``; returns the bound port (``port`` 0: a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
