"""The main job: ``python launch/train.py`` trains the default (MNIST, Signal Propagation, a fully
connected net, one Ray actor per layer) and ends with a result table. Runs unchanged under
``ray job submit -- python launch/train.py ...`` and ``ray submit``.

Exit status: 0 done, 2 bad input (one line, before any actor starts, nothing written), 3 training
stopped on a non-finite loss.
"""

from __future__ import annotations

import logging
import sys

from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.launch.report import table
from forwardflow.pipeline.messages import NonFiniteLossError
from forwardflow.pipeline.validation import ConfigError

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3

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
    print(f"forwardflow: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    quiet_ray_start()
    try:
        run = build_run(parse_config(argv)).start()
    except ConfigError as error:
        say(f"error: {error}")
        return EXIT_BAD_INPUT
    config = run.config
    say(
        f"run {run.run_id}: {config.data.dataset}, rule {config.rule.name}, {len(run.setups)} stage(s) on "
        f"{config.execution.executor} ({', '.join(run.devices)})"
    )
    if run.metrics is not None and run.metrics.url:
        say(f"metrics on {run.metrics.url}")
    try:
        with run:
            result = run.train()
    except NonFiniteLossError as error:
        say(f"error: {error}")
        return EXIT_TRAINING_FAILED
    data = run.finish(result)
    print(table(data))
    if config.output.out:
        say(f"wrote {config.output.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
