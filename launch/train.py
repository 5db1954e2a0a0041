"""The main job: ``python launch/train.py`` trains the default (MNIST, Signal Propagation, a fully
connected net, one Ray actor per layer) and ends with a result table. Runs unchanged under
``ray job submit -- python launch/train.py ...`` and ``ray submit``.

Exit status: 0 done; 1 a fault (a file could not be written, a lost stage was recovered
--max-restarts times already, a checkpoint cannot be used); 2 bad input (one line, before any
actor starts, nothing written); 3 training stopped on a diverged loss; 130 / 143 stopped by SIGINT
/ SIGTERM, at a checkpoint (``--resume OUT`` continues), or at once on a second signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from tqdm import tqdm

from forwardflow.launch.build import Run, build_run
from forwardflow.launch.cli import parse_config
from forwardflow.launch.report import placement_lines, table
from forwardflow.pipeline.checkpoint import CHECKPOINTS, complete_checkpoints
from forwardflow.pipeline.loop import StopRequest
from forwardflow.pipeline.messages import DivergenceError, RunStoppedError
from forwardflow.pipeline.training import Progress, RunObserver
from forwardflow.pipeline.validation import ConfigError

EXIT_FAULT = 1
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it

# Ray's loggers that speak while ``ray.init`` starts or joins a cluster.
RAY_START_LOGGER = "ray._private.worker"
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_ENABLED_NOTICE = "Token authentication is enabled"


class RayStartNotes(logging.Filter):
    """Drops what Ray logs at start that asks nothing of the user: its INFO lines ("Started a local
    Ray instance."; the launcher's own line says where the run goes) and the notice that token
    authentication is on, whose only suggestion is to turn it off. Authentication stays as Ray set
    it; every other warning (among them Ray's notice that authentication is *disabled*) still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == RAY_START_LOGGER:
            return record.levelno > logging.INFO
        return not record.getMessage().startswith(AUTH_ENABLED_NOTICE)


def quiet_ray_start() -> None:
    """Install the filter on Ray's loggers (by name: Ray itself is imported only for Ray runs)."""
    for name in (RAY_START_LOGGER, RAY_AUTH_LOGGER):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RayStartNotes) for f in logger.filters):
            logger.addFilter(RayStartNotes())


def say(message: str) -> None:
    print(f"forwardflow: {message}", file=sys.stderr, flush=True)


class StoppedBeforeTrainingError(Exception):
    """A signal before the run had started training: nothing to save."""


class Signals:
    """SIGINT and SIGTERM ask the run to stop at its next consistent point (a checkpoint, then a
    clean shutdown); a second one exits at once. Before training starts, a signal just stops."""

    def __init__(self) -> None:
        self.stop: StopRequest | None = None
        self.received: signal.Signals | None = None
        self.previous = {number: signal.getsignal(number) for number in SIGNAL_EXIT}

    def install(self) -> None:
        # Installed again once Ray has started: ray.init puts its own SIGTERM handling in place
        # (which aborts the driver with a C++ stack dump).
        for number in SIGNAL_EXIT:
            signal.signal(number, self._handle)

    def uninstall(self) -> None:
        """The handlers the process had before (main may run inside another program)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def watch(self, stop: StopRequest) -> None:
        self.stop = stop
        if self.received is not None:
            stop.request(self.received.name)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        received = signal.Signals(number)
        if self.received is not None:
            say(f"{received.name} again: stopped at once (the last complete checkpoint is kept)")
            os._exit(SIGNAL_EXIT[received])
        self.received = received
        if self.stop is None:
            raise StoppedBeforeTrainingError
        self.stop.request(received.name)


class RecoveryNotice(RunObserver):
    """One line when the run goes back to a checkpoint after losing a stage."""

    def __init__(self, restart_limit: int):
        self.restart_limit = restart_limit

    def on_rewind(self, progress: Progress, reason: str) -> None:
        if progress.restarts:
            tqdm.write(
                f"forwardflow: {reason}; recreated, back to microbatch {progress.microbatches_done} "
                f"(restart {progress.restarts} of {self.restart_limit}, --max-restarts)",
                file=sys.stderr,
            )


def last_checkpoint(run: Run, resumable: bool = True) -> str:
    """Where the run's newest complete checkpoint is, and how to continue from it, if any."""
    out = run.config.output.out
    found = complete_checkpoints(Path(out) / CHECKPOINTS) if out else []
    if not found:
        return "no checkpoint was kept" if out else "no checkpoint was kept (--out keeps them)"
    kept = f"the last complete checkpoint, {found[-1][0]}, is kept"
    return f"{kept}; continue with: python launch/train.py --resume {out}" if resumable else kept


def main(argv: list[str] | None = None) -> int:
    quiet_ray_start()
    signals = Signals()
    signals.install()
    try:
        return _main(argv, signals)
    except (StoppedBeforeTrainingError, KeyboardInterrupt):
        received = signals.received or signal.SIGINT
        say(f"stopped by {received.name} before training started")
        return SIGNAL_EXIT[received]
    finally:
        signals.uninstall()


def _main(argv: list[str] | None, signals: Signals) -> int:
    try:
        config = parse_config(argv)
        run = build_run(config, [RecoveryNotice(config.execution.restart_limit)]).start()
    except ConfigError as error:
        say(f"error: {error}")
        return EXIT_BAD_INPUT
    except RunStoppedError as error:  # the stages could not start as asked (--transport)
        say(f"error: {error}")
        return EXIT_FAULT
    signals.watch(run.stop)  # from now on a signal asks the run to stop at a checkpoint
    signals.install()
    config = run.config
    calls = f", {run.calls.window} microbatches in flight, {run.calls.per_call} per call" if run.calls else ""
    resumed = f", resumed at microbatch {run.resume[1].microbatches}" if run.resume else ""
    say(
        f"run {run.run_id}: {config.data.dataset}, rule {config.rule.name}, {len(run.setups)} stage(s) on "
        f"{config.execution.executor} ({', '.join(run.devices)}){calls}{resumed}"
    )
    for line in placement_lines(run):
        say(line)
    if run.metrics is not None and run.metrics.url:
        say(f"metrics on {run.metrics.url}")
    if config.execution.ray_dashboard:
        say("Ray's dashboard on http://127.0.0.1:8265 (this machine only)")
    try:
        with run:
            result = run.train()
            # Written before the run closes: the metrics endpoint may linger (--metrics-linger), and
            # a signal meanwhile must not cost the run its outputs.
            data = run.finish(result)
    except DivergenceError as error:
        say(f"error: {error}; {last_checkpoint(run, resumable=False)}")
        return EXIT_TRAINING_FAILED
    except RunStoppedError as error:  # a write failed, --max-restarts spent, a checkpoint unusable
        say(f"error: {error}; {last_checkpoint(run)}")
        return EXIT_FAULT
    if result.status != "completed":
        received = signals.received or signal.SIGINT
        say(f"stopped by {received.name}; {last_checkpoint(run)}")
        return SIGNAL_EXIT[received]
    print(table(data))
    if config.output.out:
        say(f"wrote {config.output.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
