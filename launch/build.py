"""The one way to build a run: ``build_run(config)`` turns a resolved RunConfig into a Run.

launch/train.py, every benchmark and the tests call it; nothing else constructs executors or wires
a rule's feedback loop. Building checks everything that can be checked before any actor starts
(the output directory, the data, the rule against the model, the stage plan, the device or the
cluster's address) and raises ConfigError; ``Run.start`` then starts the executor (Ray and its
actors, or the in-process runner) and the observers, and ``Run.train`` runs the training loop.

    run = build_run(config)
    with run:                      # start(); close() at the end, whatever happens
        result = run.train()
    summary = run.finish(result)   # summary.json, weights.pt, plots
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from forwardflow.launch.outputs import check_free_space, check_out, clear_run
from forwardflow.launch.report import summary, write_outputs
from forwardflow.launch.resume import resume_point
from forwardflow.monitoring.observer import MetricsConfig, MetricsObserver, check_endpoint
from forwardflow.monitoring.records import RunInfo
from forwardflow.pipeline.checkpoint import CHECKPOINTS, Checkpointer, Manifest, estimate_checkpoint_bytes
from forwardflow.pipeline.config import RunConfig
from forwardflow.pipeline.config_files import config_to_dict
from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.device import resolve_device
from forwardflow.pipeline.loop import Durability, StopRequest
from forwardflow.pipeline.messages import WriteError
from forwardflow.pipeline.model import hand_on_bytes, split_matches
from forwardflow.pipeline.rules.base import Predictor, Rule
from forwardflow.pipeline.runner import Executor, SequentialRunner
from forwardflow.pipeline.schedule import MicrobatchSchedule
from forwardflow.pipeline.sequence import SequenceDataset, SequenceSchedule, load_data
from forwardflow.pipeline.stage import StageSetup, stage_setups
from forwardflow.pipeline.training import RunObserver, RunResult, train
from forwardflow.pipeline.validation import ConfigError


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def check_local_device(name: str) -> str:
    """The device a stage in this process would use; ConfigError if this machine has no such device."""
    device = resolve_device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(
            "--device", f"{name!r} does not exist here ({torch.cuda.device_count()} CUDA devices); use cpu or auto"
        )
    return str(device)


@dataclass(frozen=True)
class StageLocation:
    """Where a stage runs, as the start line and summary.json report it."""

    device: str  # as the stage's machine numbers it: cpu, cuda:1
    host: str
    node_id: str | None = None  # Ray's node id; None in the sequential runner
    node_address: str | None = None  # the node's IP as Ray knows it
    num_cpus: float | None = None  # the stage's reservation on Ray
    num_gpus: float | None = None
    hand_off: str | None = None  # how its outputs reach the next stage (actors/transport.py); Ray only
    hand_off_reason: str | None = None


@dataclass
class Run:
    config: RunConfig
    run_id: str
    dataset: Dataset
    schedule: MicrobatchSchedule
    setups: list[StageSetup]
    calls: RayCalls | None = None  # the Ray executor's window and microbatches per call
    extra_observers: list[RunObserver] = field(default_factory=list)
    executor: Executor | None = None
    locations: list[StageLocation] = field(default_factory=list)  # each stage's, once started
    observers: list[RunObserver] = field(default_factory=list)
    metrics: MetricsObserver | None = None
    resume: tuple[Path, Manifest] | None = None  # the checkpoint a resumed run continues from
    stop: StopRequest = field(default_factory=StopRequest)  # set by the entry point's signal handlers

    # ---------------------------------------------------------------- what the rule says

    @property
    def rule(self) -> type[Rule]:
        return self.config.rule.rule_class

    @property
    def predictors(self) -> tuple[Predictor, ...]:
        """The run's predictions, the rule's own first."""
        return self.rule.predictors(self.config.model.head)

    @property
    def devices(self) -> list[str]:
        return [location.device for location in self.locations]

    # ---------------------------------------------------------------- life cycle

    def start(self) -> Run:
        """Start the executor and the observers (once); on a failure, stop what was started and raise."""
        if self.executor is not None:
            return self
        try:
            self.executor, self.locations = self._make_executor()
            # The old run goes only once the stages have started: a plan the cluster cannot hold
            # (exit 2) or a stage that cannot start leaves it as it was.
            if self.config.output.overwrite and self.config.output.out:
                clear_run(Path(self.config.output.out))
            self.observers = self._make_observers()
        except BaseException:
            self.close()
            raise
        return self

    def _make_executor(self) -> tuple[Executor, list[StageLocation]]:
        execution = self.config.execution
        if execution.executor == "sequential":
            device = check_local_device(execution.device)
            torch.set_num_threads(execution.threads)
            here = StageLocation(device=device, host=socket.gethostname())
            runner = SequentialRunner(self.setups, self.dataset, device, self.config.data.placement, execution.streams)
            return runner, [here] * len(self.setups)
        # Ray is imported only when it is used.
        from forwardflow.actors.cluster import connect
        from forwardflow.actors.placement import cluster_nodes, plan_placement
        from forwardflow.actors.ray_pipeline import RayPipeline

        connect(execution.address, execution.ray_dashboard)
        assert self.calls is not None  # decided by build_run for every Ray run
        # The plan is checked against the cluster's nodes before any actor starts.
        placements = plan_placement(len(self.setups), execution, cluster_nodes())
        pipeline = RayPipeline(
            self.setups,
            self.dataset,
            placements,
            self.calls.window,
            self.calls.per_call,
            execution.threads,
            self.config.data.placement,
            execution.streams,
            execution.transport_choice,
        )
        return pipeline, ray_locations(pipeline)

    def _make_observers(self) -> list[RunObserver]:
        config = self.config
        observers: list[RunObserver] = []
        if config.monitoring.progress:
            from forwardflow.launch.progress import ProgressBar

            observers.append(ProgressBar())
        if config.monitoring.metrics_port or config.output.out:
            info = RunInfo(
                run_id=self.run_id,
                dataset=config.data.dataset,
                rule=config.rule.name,
                model=config.model.name,
                executor=config.execution.executor,
                stages=len(self.setups),
                epochs=config.schedule.epochs,
            )
            self.metrics = MetricsObserver(
                MetricsConfig(settings=config.monitoring, info=info, devices=tuple(self.devices), out=config.output.out)
            )
            observers.append(self.metrics)
        return observers + self.extra_observers

    def durability(self) -> Durability:
        """Checkpoints (with --out), recovery of lost stages (Ray), the stop request, the resume."""
        config, output = self.config, self.config.output
        checkpoints = None
        if output.out and output.checkpoints:
            checkpoints = Checkpointer(
                Path(output.out) / CHECKPOINTS,
                self.run_id,
                config_to_dict(config),
                keep=output.checkpoints_kept,
                stages_write=output.stages_write_shards,
            )
        return Durability(
            checkpoints=checkpoints,
            every=output.checkpoint_interval,
            period_s=output.checkpoint_period_s,
            max_restarts=config.execution.restart_limit if config.execution.executor == "ray" else 0,
            stop=self.stop,
            resume=self.resume,
        )

    def train(self) -> RunResult:
        """The training loop, with the rule's own prediction and feedback loop."""
        if self.executor is None:
            raise RuntimeError("start the run first")
        feedback = self.rule.make_feedback(self.config, self.dataset.num_classes, self.dataset.input_shape)
        try:
            metric = self.dataset.target_spec.metric
            result = train(
                self.schedule,
                self.executor,
                self.predictors[0].key,
                self.observers,
                feedback,
                self.durability(),
                metric=metric,
            )
            if result.restarts:
                # Recreated actors may run in other processes, and hand on by other transports.
                self.locations = ray_locations(self.executor)
            return result
        except Exception as error:
            if self.metrics is not None:
                with contextlib.suppress(WriteError):  # the log may be what could not be written
                    self.metrics.on_error(error)  # forwardflow_errors_total and the metrics log
            raise

    def finish(self, result: RunResult) -> dict[str, Any]:
        """The summary; with --out, summary.json and weights.pt (and the plots with --plot)."""
        data = summary(self, result)
        out = self.config.output.out
        if out:
            write_outputs(Path(out), data, result)
            if self.config.monitoring.plot:
                from forwardflow.monitoring.report import write_plots

                for path in write_plots(Path(out), self.run_id):
                    print(f"forwardflow: wrote {path}", file=sys.stderr)
        return data

    def close(self) -> None:
        """Stop the executor, then the metrics endpoint (after its linger, so that a last scrape
        sees the end)."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None
            if self.config.execution.executor == "ray":
                from forwardflow.actors.cluster import disconnect

                disconnect()  # shuts down the local Ray this run started, if it did
        if self.metrics is not None:
            self.metrics.close(cut_short=lambda: self.stop.requested)
            self.metrics = None

    def __enter__(self) -> Run:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def stage_device(location: dict[str, str]) -> str:
    """A Ray stage's device as its machine numbers it: Ray narrows each actor's
    CUDA_VISIBLE_DEVICES, so the actor's own name for its GPU is the same on every GPU."""
    if location["device"].startswith("cuda") and location["gpus"]:
        return "cuda:" + location["gpus"]
    return location["device"]


def with_measured_split(config: RunConfig, input_shape: tuple[int, ...]) -> RunConfig:
    """``config`` with ``model.split`` from a short profiling pass, when the run groups layers into
    fewer stages by time and has no matching split yet (a rerun from summary.json has one)."""
    model, stages = config.model, config.num_stages
    if model.balance != "time" or stages in (1, model.num_layers) or split_matches(model, stages):
        return config
    device = resolve_device(config.execution.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return config  # the stages' GPUs are elsewhere (a Ray cluster): multiply-accumulates it is
    from forwardflow.pipeline.profiling import measured_split

    batch = config.schedule.batch_size
    split = measured_split(model, input_shape, stages, batch, device, config.execution.threads)
    return replace(config, model=replace(model, split=split))


@dataclass(frozen=True)
class RayCalls:
    """How the Ray driver feeds the stages: microbatches in flight, and per actor call."""

    window: int
    per_call: int


def ray_calls(config: RunConfig, setups: list[StageSetup], num_classes: int) -> RayCalls:
    """The Ray pipeline's window and microbatches per call: as given, else sized from the stages'
    hand-offs. Kept beside the config, not in it, so that a rerun of summary.json's config decides
    them again (and may run sequentially)."""
    execution = config.execution
    in_flight = hand_on_bytes([setup.spec for setup in setups], config.schedule.batch_size, num_classes)
    window = execution.ray_window(in_flight, config.rule.rule_class.uses_window)
    # Enough calls in flight for every stage to have one in hand, and one more being collected.
    per_call = execution.microbatches_per_call or max(1, window // (len(setups) + 1))
    return RayCalls(window, per_call)


def ray_locations(pipeline: Any) -> list[StageLocation]:
    """Where each stage of a RayPipeline runs now: device, host, node, reservation, hand-off."""
    return [
        StageLocation(
            device=stage_device(location),
            host=location["host"],
            node_id=location["node_id"],
            node_address=placement.node_address,
            num_cpus=placement.num_cpus,
            num_gpus=placement.num_gpus,
            hand_off=hand_off.transport,
            hand_off_reason=hand_off.reason,
        )
        for location, placement, hand_off in zip(pipeline.locations, pipeline.placements, pipeline.hand_offs)
    ]


def build_run(config: RunConfig, observers: Sequence[RunObserver] = (), run_id: str | None = None) -> Run:
    """Everything that can reject the input, before any actor starts; raises ConfigError.
    ``observers`` watch the run beside the ones the config asks for (progress bar, metrics).
    A resumed run (``config.output.resume``) keeps its run id."""
    resume = resume_point(config) if config.output.resume is not None else None
    if resume is not None:
        run_id = resume[1].run_id
    check_out(config.output)
    check_endpoint(config.monitoring)
    dataset = load_data(config.data, config.seed)
    config.rule.rule_class.check(config, dataset.num_classes, dataset.input_shape)
    execution = config.execution
    if execution.executor == "ray" and execution.address:
        from forwardflow.actors.cluster import check_address

        check_address(execution.address)
    elif execution.executor == "sequential" or not os.environ.get("RAY_ADDRESS"):
        # The stages will run on this machine's devices; under `ray job submit` (RAY_ADDRESS) they
        # run on the cluster's, which the placement plan checks once Ray is joined.
        check_local_device(execution.device)
    config = with_measured_split(config, dataset.input_shape)
    if isinstance(dataset, SequenceDataset):  # one microbatch per time step
        schedule: MicrobatchSchedule = SequenceSchedule(dataset, config.schedule, config.seed)
    else:
        schedule = MicrobatchSchedule(dataset, config.schedule, config.seed, config.data.augment)
    setups = stage_setups(
        config,
        dataset.num_classes,
        dataset.input_shape,
        total_steps=schedule.total_train_microbatches,
        target=dataset.target_spec,
    )
    check_free_space(config.output, estimate_checkpoint_bytes(setups))
    calls = ray_calls(config, setups, dataset.num_classes) if execution.executor == "ray" else None
    return Run(
        config=config,
        run_id=run_id or new_run_id(),
        dataset=dataset,
        schedule=schedule,
        setups=setups,
        calls=calls,
        extra_observers=list(observers),
        resume=resume,
    )
