"""The Prometheus endpoint of one run: ``prometheus_client`` in the driver, with a registry of its
own (not the process-wide default), fed with the batched records of ``monitoring.records``.

Every metric starts with ``forwardflow_``, carries the run id, and per-stage metrics carry the
stage index and its device. Counters end in ``_total``, units are in the names (``_seconds``,
``_bytes``, ``_ratio``). The README's metrics reference lists each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest, start_http_server

from monitoring.records import RunRecord, StageRecord

PREFIX = "forwardflow_"
STAGE_LABELS = ("run_id", "stage", "device")
# Step times from tens of microseconds (a tiny layer on a GPU) to seconds (a conv stage on a CPU).
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0)
NON_FINITE_LOSS = "non_finite_loss"  # the error kind every run exports from the start (at 0)


@dataclass(frozen=True)
class RunInfo:
    """Constant facts about the run, exported as ``forwardflow_run_info`` (the run selector's
    source)."""

    run_id: str
    dataset: str
    rule: str
    model: str
    executor: str
    stages: int
    epochs: int

    def __post_init__(self):
        if not self.run_id:
            raise ValueError("a run needs a run id")


class PrometheusExporter:
    def __init__(self, info: RunInfo, devices: list[str]):
        self.info = info
        self.devices = devices
        self.registry = CollectorRegistry(auto_describe=True)
        self._server = None
        self._last_stages: dict[int, StageRecord] = {}
        self._train_samples = 0
        self._errors_seen: dict[str, int] = {}
        reg = self.registry

        def stage_metric(kind, name, documentation, **extra):
            return kind(PREFIX + name, documentation, STAGE_LABELS, registry=reg, **extra)

        def run_metric(kind, name, documentation, labels=("run_id",)):
            return kind(PREFIX + name, documentation, labels, registry=reg)

        # prometheus_client appends _total to a Counter's name itself.
        self.stage_samples = stage_metric(Counter, "stage_samples", "Training samples processed by the stage")
        self.stage_microbatches = stage_metric(Counter, "stage_microbatches",
                                               "Microbatches (training and evaluation) processed by the stage")
        self.stage_backlog = stage_metric(Gauge, "stage_queued_microbatches",
                                          "Microbatches handed to the stage that it has not finished "
                                          "(its input queue plus the one it is computing)")
        self.stage_compute = stage_metric(Counter, "stage_compute_seconds",
                                          "Time the stage spent computing (forward, local loss, update)")
        self.stage_wait = stage_metric(Counter, "stage_wait_seconds",
                                       "Time the stage spent between steps, waiting for its input")
        self.stage_handoff = stage_metric(Counter, "stage_handoff_seconds",
                                          "Time the stage spent handing its output on (copy to the host)")
        self.stage_step = stage_metric(Histogram, "stage_step_seconds",
                                       "Compute time of one training microbatch in the stage", buckets=STEP_BUCKETS)
        self.stage_loss = stage_metric(Gauge, "stage_loss",
                                       "The stage's local loss, mean over the training microbatches since "
                                       "the previous collection")
        self.stage_accuracy = stage_metric(Gauge, "stage_train_accuracy_ratio",
                                           "The stage's own nearest-target accuracy on training microbatches "
                                           "since the previous collection")
        self.stage_lr = stage_metric(Gauge, "stage_learning_rate", "The stage optimizer's learning rate")
        self.stage_weight_norm = stage_metric(Gauge, "stage_weight_norm", "L2 norm of all the stage's weights")
        self.stage_update_norm = stage_metric(Gauge, "stage_update_norm",
                                              "L2 norm of the change of the stage's weights since the "
                                              "previous collection")
        self.stage_memory = stage_metric(Gauge, "stage_memory_bytes",
                                         "GPU memory allocated by the stage (process RSS on a CPU)")
        self.stage_peak_memory = stage_metric(Gauge, "stage_peak_memory_bytes",
                                              "Peak GPU memory allocated by the stage (peak RSS on a CPU)")
        self.train_samples = run_metric(Counter, "train_samples",
                                        "Training samples whose predictions came back to the driver")
        self.samples_per_second = run_metric(Gauge, "train_samples_per_second",
                                             "Training samples per second since the previous collection")
        self.test_accuracy = run_metric(Gauge, "test_accuracy_ratio",
                                        "Test accuracy after the latest epoch, per predictor",
                                        labels=("run_id", "predictor"))
        self.epoch = run_metric(Gauge, "epoch", "Epoch of the latest completed microbatch (1-based)")
        self.progress = run_metric(Gauge, "progress_ratio", "Fraction of the run's microbatches completed")
        self.eta = run_metric(Gauge, "eta_seconds", "Estimated time left")
        self.in_flight = run_metric(Gauge, "microbatches_in_flight",
                                    "Microbatches submitted whose predictions have not come back")
        self.restarts = run_metric(Counter, "actor_restarts",
                                   "Stage actor restarts (stages run with max_restarts=0: a failed "
                                   "stage stops the run and counts in errors instead)")
        self.errors = run_metric(Counter, "errors", "Errors that stopped the run, per kind",
                                 labels=("run_id", "kind"))
        Info(PREFIX + "run", "The run's dataset, rule, model, executor, stages and epochs", ["run_id"],
             registry=reg).labels(info.run_id).info(
            {"dataset": info.dataset, "rule": info.rule, "model": info.model, "executor": info.executor,
             "stages": str(info.stages), "epochs": str(info.epochs)})
        # Series that exist from the start, so that a dashboard shows 0 rather than "no data".
        self.restarts.labels(info.run_id)
        self.errors.labels(info.run_id, NON_FINITE_LOSS)
        self.train_samples.labels(info.run_id)

    def update(self, record: RunRecord) -> None:
        run = self.info.run_id
        self.train_samples.labels(run).inc(max(0, record.train_samples - self._train_samples))
        self._train_samples = max(self._train_samples, record.train_samples)
        self.samples_per_second.labels(run).set(record.samples_per_s)
        self.epoch.labels(run).set(record.epoch)
        self.progress.labels(run).set(record.progress)
        self.eta.labels(run).set(record.eta_s)
        self.in_flight.labels(run).set(record.in_flight)
        for predictor, accuracy in record.test_accuracy.items():
            self.test_accuracy.labels(run, predictor).set(accuracy)
        for kind, count in record.errors.items():
            self.errors.labels(run, kind).inc(count - self._errors_seen.get(kind, 0))
            self._errors_seen[kind] = count
        for stage in record.stages or ():
            self._update_stage(stage)
        for stage, depth in enumerate(record.backlog):
            self.stage_backlog.labels(run, str(stage), self.devices[stage]).set(depth)

    def _update_stage(self, stage: StageRecord) -> None:
        labels = (self.info.run_id, str(stage.stage), stage.device)
        previous = self._last_stages.get(stage.stage)
        self._last_stages[stage.stage] = stage

        def advance(counter: Counter, now: float, before: float) -> None:
            counter.labels(*labels).inc(max(0.0, now - before))  # counters only go up

        advance(self.stage_samples, stage.samples, previous.samples if previous else 0)
        advance(self.stage_microbatches, stage.microbatches, previous.microbatches if previous else 0)
        advance(self.stage_compute, stage.compute_s, previous.compute_s if previous else 0.0)
        advance(self.stage_wait, stage.wait_s, previous.wait_s if previous else 0.0)
        advance(self.stage_handoff, stage.handoff_s, previous.handoff_s if previous else 0.0)
        if stage.loss is not None:
            self.stage_loss.labels(*labels).set(stage.loss)
        if stage.train_accuracy is not None:
            self.stage_accuracy.labels(*labels).set(stage.train_accuracy)
        self.stage_lr.labels(*labels).set(stage.lr)
        self.stage_weight_norm.labels(*labels).set(stage.weight_norm)
        self.stage_update_norm.labels(*labels).set(stage.update_norm)
        self.stage_memory.labels(*labels).set(stage.memory_bytes)
        self.stage_peak_memory.labels(*labels).set(stage.peak_memory_bytes)

    def observe_step_times(self, stage: int, device: str, step_times: list[float]) -> None:
        histogram = self.stage_step.labels(self.info.run_id, str(stage), device)
        for seconds in step_times:
            if math.isfinite(seconds):
                histogram.observe(seconds)

    def text(self) -> bytes:
        """The exposition in Prometheus text format, as the endpoint serves it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
