"""Shared by the benchmarks: run a configuration given as command-line arguments, exactly as
``launch/train.py`` would, and describe the machine."""

from __future__ import annotations

import os
import platform
import time

import torch

from launch.train import make_executor, prepare
from pipeline.training import RunResult, train


def run(argv: list[str]) -> RunResult:
    config, schedule, setups, _ = prepare(argv + ["--no-progress"])
    executor, _ = make_executor(config, setups)
    try:
        return train(schedule, executor)
    finally:
        executor.close()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB, {gpu}, torch {torch.__version__}"


def today() -> str:
    return time.strftime("%Y-%m-%d")
