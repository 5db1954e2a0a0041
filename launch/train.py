"""The main job: ``python launch/train.py`` trains the default (MNIST, Signal Propagation, a fully
connected net, one Ray actor per layer) and ends with a result table. Runs unchanged under
``ray job submit -- python launch/train.py ...`` and ``ray submit``.

Exit status: 0 done, 2 bad input (one line, before any actor starts, nothing written), 3 training
stopped on a non-finite loss.
"""

from __future__ import annotations

import sys

from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.launch.report import table
from forwardflow.pipeline.messages import NonFiniteLossError
from forwardflow.pipeline.validation import ConfigError

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3


def say(message: str) -> None:
    print(f"forwardflow: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
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
    if config.execution.ray_dashboard:
        say("Ray's dashboard on http://127.0.0.1:8265 (this machine only)")
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
