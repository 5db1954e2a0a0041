"""The main job: ``python launch/train.py`` trains the default (MNIST, Signal Propagation, a fully
connected net, one Ray actor per layer) and ends with a result table. Runs unchanged under
``ray job submit --working-dir . -- python launch/train.py ...`` and ``ray submit``."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from launch.cli import fail, parse
from launch.observers import check_observer_args, close_observers, make_observers, record_error
from launch.report import summary, table, write_outputs
from pipeline.config import ConfigError, TrainConfig
from pipeline.data import load_dataset
from pipeline.messages import NonFiniteLossError
from pipeline.rules.registry import check_rule, make_feedback
from pipeline.runner import Executor, SequentialRunner
from pipeline.schedule import MicrobatchSchedule, ScheduleConfig
from pipeline.stage import StageSetup, resolve_device, stage_setups
from pipeline.training import RunObserver, train

EXIT_TRAINING_FAILED = 3


def check_sequential_device(name: str) -> str:
    device = resolve_device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError("device", f"{name!r} does not exist here ({torch.cuda.device_count()} CUDA devices); "
                                    f"use cpu or auto")
    return str(device)


def check_out_dir(out: str | None) -> None:
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError("out", f"{out!r} exists and is not a directory")


def make_executor(config: TrainConfig, setups: list[StageSetup]) -> tuple[Executor, list[str]]:
    """The executor and each stage's device. Ray is imported only when it is used."""
    execution = config.execution
    if execution.executor == "sequential":
        device = check_sequential_device(execution.device)
        torch.set_num_threads(execution.torch_threads)
        return SequentialRunner(setups, device), [device] * len(setups)
    from actors.cluster import connect
    from actors.placement import plan_placement
    from actors.ray_pipeline import RayPipeline

    placement = plan_placement(len(setups), execution.device, connect(execution.address))
    pipeline = RayPipeline(setups, placement, execution.window, execution.placement, execution.torch_threads)
    return pipeline, [stage_device(location) for location in pipeline.locations]


def stage_device(location: dict[str, str]) -> str:
    """A Ray stage's device as its machine numbers it: Ray narrows each actor's
    CUDA_VISIBLE_DEVICES, so the actor's own name for its GPU is the same on every GPU."""
    if location["device"].startswith("cuda") and location["gpus"]:
        return "cuda:" + location["gpus"]
    return location["device"]


def prepare(argv: list[str] | None) -> tuple[TrainConfig, MicrobatchSchedule, list[StageSetup], object]:
    """Everything that can reject the input, before any actor starts."""
    config, args = parse(argv)
    config = replace(config, run_id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    try:
        check_out_dir(config.out)
        check_observer_args(config, args)
        dataset = load_dataset(config.data, config.seed)
        schedule = MicrobatchSchedule(dataset, ScheduleConfig(config.data.batch_size, config.data.eval_batch_size,
                                                              config.epochs, config.seed, config.data.augment))
        setups = stage_setups(config, dataset.num_classes, dataset.input_shape,
                              total_steps=schedule.train_microbatches_per_epoch * config.epochs)
        check_rule(config, dataset.num_classes, dataset.input_shape)
        if config.execution.address and config.execution.executor == "ray":
            from actors.cluster import check_address
            check_address(config.execution.address)
        else:  # the stages will run on this machine's devices
            check_sequential_device(config.execution.device)
    except ConfigError as error:
        fail(str(error))
    return config, schedule, setups, args


def main(argv: list[str] | None = None) -> int:
    config, schedule, setups, args = prepare(argv)
    try:
        executor, devices = make_executor(config, setups)
    except ConfigError as error:
        fail(str(error))
    try:
        observers = make_observers(config, args, devices)
    except ConfigError as error:  # the metrics endpoint could not bind
        executor.close()
        fail(str(error))
    print(f"forwardflow: run {config.run_id}: {config.data.dataset}, rule {config.rule.name}, "
          f"{len(setups)} stage(s) on {config.execution.executor} ({', '.join(devices)})", file=sys.stderr)
    try:
        return run(config, schedule, executor, devices, observers, args)
    finally:
        close_observers(observers)  # after --metrics-linger, so that a last scrape sees the end


def run(config: TrainConfig, schedule: MicrobatchSchedule, executor: Executor, devices: list[str],
        observers: list[RunObserver], args: argparse.Namespace) -> int:
    try:
        dataset = schedule.dataset
        result = train(schedule, executor, observers, make_feedback(config, dataset.num_classes, dataset.input_shape))
    except Exception as error:
        record_error(observers, error)
        if not isinstance(error, NonFiniteLossError):
            raise
        print(f"forwardflow: error: {error}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    finally:
        executor.close()
    data = summary(config, result, config.execution.executor, devices)
    print(table(data))
    if config.out:
        write_outputs(Path(config.out), data, result)
        print(f"forwardflow: wrote {Path(config.out) / 'summary.json'}", file=sys.stderr)
        if args.plot:
            from monitoring.report import write_plots

            for path in write_plots(Path(config.out), config.run_id):
                print(f"forwardflow: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
