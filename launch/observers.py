"""Which observers watch a run: each decides for itself when it is time to act."""

from __future__ import annotations

import argparse

from launch.progress import ProgressBar
from pipeline.config import TrainConfig
from pipeline.training import RunObserver


def make_observers(config: TrainConfig, args: argparse.Namespace) -> list[RunObserver]:
    observers: list[RunObserver] = []
    if not args.no_progress:
        observers.append(ProgressBar())
    return observers
