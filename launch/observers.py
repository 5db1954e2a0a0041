"""Which observers watch a run: each decides for itself when it is time to act."""

from __future__ import annotations

import argparse

from launch.progress import ProgressBar
from monitoring.exporter import RunInfo
from monitoring.observer import MetricsConfig, MetricsObserver
from pipeline.config import ConfigError, TrainConfig
from pipeline.training import RunObserver


def check_observer_args(config: TrainConfig, args: argparse.Namespace) -> None:
    """Reject bad monitoring flags before any actor starts (raises ConfigError)."""
    if args.plot and not config.out:
        raise ConfigError("plot", "needs --out: the plots are drawn from the run's metrics log there")
    if not 0.05 <= args.metrics_interval <= 3600:
        raise ConfigError("metrics_interval", f"must be between 0.05 and 3600 seconds (got {args.metrics_interval!r})")
    if not 0 <= args.metrics_linger <= 3600:
        raise ConfigError("metrics_linger", f"must be between 0 and 3600 seconds (got {args.metrics_linger!r})")


def make_observers(config: TrainConfig, args: argparse.Namespace, devices: list[str]) -> list[RunObserver]:
    """The progress bar, and the metrics observer when there is an endpoint or an ``--out``
    directory to keep the metrics log in. Raises ConfigError when the endpoint cannot bind."""
    observers: list[RunObserver] = []
    if not args.no_progress:
        observers.append(ProgressBar())
    execution = config.execution
    if execution.metrics_port or config.out:
        info = RunInfo(run_id=config.run_id, dataset=config.data.dataset, rule=config.rule.name,
                       model=config.model.name, executor=execution.executor, stages=len(devices),
                       epochs=config.epochs)
        observers.append(MetricsObserver(MetricsConfig(
            info=info, devices=tuple(devices), port=execution.metrics_port, host=execution.metrics_host,
            out=config.out, interval_s=args.metrics_interval, linger_s=args.metrics_linger)))
    return observers


def record_error(observers: list[RunObserver], error: BaseException) -> None:
    """Count the error that stopped the run (forwardflow_errors_total, the metrics log)."""
    for observer in observers:
        if isinstance(observer, MetricsObserver):
            observer.on_error(error)


def close_observers(observers: list[RunObserver]) -> None:
    """Stop the metrics endpoint (after ``--metrics-linger`` seconds)."""
    for observer in observers:
        if isinstance(observer, MetricsObserver):
            observer.close()
