"""Shared by the benchmarks: run a configuration given as command-line arguments through the one
builder, exactly as ``launch/train.py`` would, and describe the machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.pipeline.training import RunObserver, RunResult


def run(argv: list[str], observers: Sequence[RunObserver] = ()) -> RunResult:
    with build_run(parse_config(argv + ["--no-progress"]), observers) as built:
        return built.train()


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


def load_line() -> str:
    """The report's last line: how busy the machine was (figures from a busy one are rough)."""
    return f"Load average (1 min) when the report was written: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."


def write_report(path: str | Path, text: str) -> None:
    """A benchmark's markdown report: written (its folder made if needed) and printed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
