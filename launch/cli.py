"""Command line -> TrainConfig. Bad input ends here with one line naming the field and what is
allowed, and exit status 2, before any actor starts and before anything is written."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import NoReturn

from pipeline.config import (DATASETS, EXECUTORS, PLACEMENTS, POSITIVES, RULE_OPTIONS, RULES, SIGPROP_LOSSES,
                             TARGET_LAYERS, ConfigError, TrainConfig, flag_name)
from pipeline.presets import DEFAULT_PRESET, PRESETS

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("argument ", "", 1)
        fail(message)


def fail(message: str) -> NoReturn:
    print(f"forwardflow: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _choices(values) -> str:
    return ", ".join(values)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="launch/train.py", description="Train a network layer-parallel, "
                           "each stage learning from its own local loss (no backpropagation between stages).")
    add = parser.add_argument
    add("--preset", default=DEFAULT_PRESET, help=f"one of {_choices(PRESETS)} (default {DEFAULT_PRESET})")
    add("--dataset", help=f"one of {_choices(DATASETS)}")
    add("--rule", help=f"learning rule: one of {_choices(RULES)}")
    add("--loss", help=f"sigprop loss: one of {_choices(SIGPROP_LOSSES)}")
    add("--positives", help=f"sigprop contrastive loss, which same-label samples are positives: one of "
                            f"{_choices(POSITIVES)}")
    add("--topk", type=int, help="sigprop --positives topk: how many")
    add("--target-layer", help=f"sigprop target layer: one of {_choices(TARGET_LAYERS)}")
    add("--temperature", type=float, help="sigprop score temperature (0: sqrt of the features per position)")
    add("--ff-threshold", type=float, help="ff goodness threshold per unit (theta)")
    add("--hard-negatives", "--ff-hard-negatives", action=argparse.BooleanOptionalAction, default=None,
        dest="ff_hard_negatives", help="ff: negatives carry the most confusable wrong label instead of a "
                                       "random one (on in the ff presets; --no-hard-negatives: random)")
    add("--head-width", type=int, help="local: hidden units of each stage's classifier (0: linear)")
    add("--epochs", type=int)
    add("--batch-size", type=int, help="training microbatch size")
    add("--lr", type=float, help="learning rate of every stage's optimizer")
    add("--stages", type=int, help="number of pipeline stages (default: one per layer; 1 for bp)")
    add("--device", help="auto, cpu, cuda or cuda:N")
    add("--data-dir", help="where the dataset's files are (default: $FORWARDFLOW_DATA_DIR, then the set-up path's)")
    add("--seed", type=int)
    add("--address", help="an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); default: local Ray")
    add("--out", help="write summary.json, weights.pt and metrics.jsonl into this directory")
    add("--executor", help=f"one of {_choices(EXECUTORS)} (default ray)")
    add("--window", type=int, help="microbatches in flight in the Ray pipeline (default 8)")
    add("--placement", help=f"one of {_choices(PLACEMENTS)}: stages on one node or across nodes")
    add("--threads", type=int, dest="torch_threads", help="torch threads per stage (default 1)")
    add("--train-limit", type=int, help="use only the first N training samples")
    add("--test-limit", type=int, help="use only the first N test samples")
    add("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: off)")
    add("--metrics-host", help="address the metrics endpoint binds to (default 127.0.0.1)")
    add("--metrics-interval", type=float, default=1.0,
        help="seconds between metrics collections (endpoint and metrics.jsonl; default 1)")
    add("--metrics-linger", type=float, default=0.0,
        help="keep serving metrics this many seconds after the run, for a last scrape (default 0)")
    add("--plot", action="store_true", help="write PNG plots of the run into --out")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


# Which TrainConfig section each flag overrides.
SECTIONS = {
    "data": ("dataset", "batch_size", "data_dir", "train_limit", "test_limit"),
    "optim": ("lr",),
    "execution": ("device", "address", "executor", "window", "placement", "torch_threads",
                  "metrics_port", "metrics_host"),
    "top": ("epochs", "seed", "out"),
    "rule": tuple(RULE_OPTIONS),
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset with the given flags applied; raises ConfigError for a bad value."""
    if args.preset not in PRESETS:
        raise ConfigError("preset", f"{args.preset!r} is not one of {_choices(PRESETS)}")
    config = PRESETS[args.preset]()
    given = {name: value for name, value in vars(args).items() if value is not None}
    sections = {"data": config.data, "optim": config.optim, "execution": config.execution}
    for section, names in SECTIONS.items():
        changes = {name: given[name] for name in names if name in given}
        if changes and section in sections:
            sections[section] = replace(sections[section], **changes)
    rule = config.rule
    if "rule" in given:
        rule = replace(rule, name=given["rule"])
    rule_changes = {name: given[name] for name in SECTIONS["rule"] if name in given}
    for name in rule_changes:
        if rule.name not in RULE_OPTIONS[name]:  # a flag that would silently do nothing
            raise ConfigError(name, f"applies to --rule {', '.join(RULE_OPTIONS[name])} only (the rule is {rule.name})")
    rule = replace(rule, **rule_changes)
    model = config.model if "stages" not in given else replace(config.model, stages=given["stages"])
    if "stages" in given and given["stages"] < 1:
        raise ConfigError("stages", f"must be at least 1 (got {given['stages']})")
    top = {name: given[name] for name in SECTIONS["top"] if name in given}
    return replace(config, model=model, rule=rule, **sections, **top)


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    try:
        return config_from_args(args), args
    except ConfigError as error:
        fail(str(error))
    except TypeError as error:  # a value of the wrong type reached a dataclass
        fail(f"{flag_name('config')}: {error}")
