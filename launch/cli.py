"""The command line, generated from the config tree (pipeline/config.py and every rule's options).

Every field declared with ``option`` becomes a flag with its help and its default (the default
preset's value); every rule's options become flags accepted only with that rule. ``--preset``
picks the starting config, ``--config FILE`` (TOML, JSON, or a run's summary.json) overrides it,
and the flags given override both. Only flags the user typed change anything: argparse's defaults
are all None here.

Why a small generator rather than tyro or jsonargparse: both derive nested flag names from the
tree (``--data.batch-size``, ``--rule.options.loss``) and cannot accept a rule's options only with
that rule; the flags users already type (``--batch-size``, ``--lr``, ``--threads``) stay as they are,
and the whole generator is the ~120 lines below.
"""

from __future__ import annotations

import argparse
from dataclasses import Field, dataclass, fields, replace
from typing import Any, NoReturn

from forwardflow.launch.resume import resumed_config, without_ray_settings
from forwardflow.pipeline.config import RuleConfig, RunConfig
from forwardflow.pipeline.config_files import load_config_file
from forwardflow.pipeline.presets import DEFAULT_PRESET, PRESETS
from forwardflow.pipeline.rules.registry import RULES
from forwardflow.pipeline.validation import ConfigError, Section, field_flag, plain_type

SECTIONS = ("data", "model", "rule", "optim", "schedule", "execution", "monitoring", "output")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a parse error raises ConfigError (one line naming the flag) instead of
    printing a usage block and exiting: the entry point decides how to stop."""

    def error(self, message: str) -> NoReturn:
        where, _, what = message.removeprefix("argument ").partition(": ")
        raise ConfigError(where if where.startswith("-") else "arguments", what or message)


@dataclass(frozen=True)
class Flag:
    """One generated flag: the config field behind it, and (for rule options) the rules that own it."""

    flag: str
    section: str  # "" for RunConfig's own fields
    name: str
    rules: tuple[str, ...] = ()


def _leaf_fields(section: type[Section]) -> list[Field]:
    return [item for item in fields(section) if item.metadata.get("cli", True)]  # type: ignore[arg-type]


def _add(group, item: Field, owner: type[Section], dest: str, default: Any) -> None:
    kind, _ = plain_type(owner.field_types()[item.name])
    choices = item.metadata.get("choices")
    shown = "on" if default is True else "off" if default is False else default
    help_text = item.metadata.get("help", "") + ("" if default is None else f" (default: {shown})")
    help_text = help_text.replace("%", "%%")  # argparse formats help with %
    if kind is bool:
        group.add_argument(
            field_flag(item), dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    else:
        metavar = "{" + ",".join(choices) + "}" if choices else item.name.upper()
        group.add_argument(
            field_flag(item),
            dest=dest,
            type=kind if kind in (int, float) else str,
            default=None,
            metavar=metavar,
            help=help_text,
        )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Flag]]:
    """The parser and, by argparse destination, what each flag sets."""
    # No abbreviations: a prefix such as --microbatch would silently set whichever flag it begins
    # (--microbatches-per-call), and a flag added later would turn old command lines ambiguous.
    parser = OneLineParser(
        prog="launch/train.py",
        allow_abbrev=False,
        description="Train a network layer-parallel, each stage learning from its own local loss (no "
        "backpropagation between stages). Defaults shown are the default preset's; another preset "
        "changes some of them.",
    )
    parser.add_argument(
        "--preset",
        default=None,
        metavar="{" + ",".join(PRESETS) + "}",
        help=f"starting configuration (default: {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML or JSON config file, or a run's summary.json, "
        "applied over the preset (the flags given apply over both)",
    )
    defaults = PRESETS[DEFAULT_PRESET]()
    flags: dict[str, Flag] = {}
    for section_name in SECTIONS + ("",):
        section = getattr(defaults, section_name) if section_name else defaults
        group = parser.add_argument_group(section_name or "run")
        for item in _leaf_fields(type(section)):
            dest = f"{section_name}.{item.name}"
            _add(group, item, type(section), dest, getattr(section, item.name))
            flags[dest] = Flag(field_flag(item), section_name, item.name)
    for rule in RULES.values():
        group = parser.add_argument_group(f"--rule {rule.name} options")
        for item in _leaf_fields(rule.Options):
            dest = f"rule.options.{field_flag(item)}"
            if dest in flags:  # the same flag in several rules: one argument, several owners
                flags[dest] = replace(flags[dest], rules=flags[dest].rules + (rule.name,))
                continue
            _add(group, item, rule.Options, dest, getattr(rule.Options(), item.name))
            flags[dest] = Flag(field_flag(item), "rule.options", item.name, (rule.name,))
    return parser, flags


def _with_rule_options(rule: RuleConfig, given: dict[Flag, Any]) -> RuleConfig:
    """The rule section with the rule's own option flags applied; a flag of another rule is refused
    rather than silently ignored."""
    changes = {}
    for flag, value in given.items():
        if rule.name not in flag.rules:
            raise ConfigError(flag.flag, f"applies to --rule {', '.join(flag.rules)} only (the rule is {rule.name})")
        changes[flag.name] = value
    if not changes:
        return rule
    assert rule.options is not None  # filled with the rule's defaults when the section was built
    return replace(rule, options=replace(rule.options, **changes))


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """The resolved config of a command line; raises ConfigError for anything bad."""
    parser, flags = build_parser()
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        token = unknown[0]
        if token.startswith("-"):
            raise ConfigError(token, "unknown flag (launch/train.py --help lists them)")
        raise ConfigError("arguments", f"unexpected {token!r}: every setting is a flag (launch/train.py --help)")
    args = vars(known)
    preset, config_file, resume = args.pop("preset"), args.pop("config"), args.get("output.resume")
    if preset is not None and preset not in PRESETS:
        raise ConfigError("--preset", f"{preset!r} is not one of {', '.join(PRESETS)}")
    if resume is not None:
        # The run's own settings, from its newest checkpoint; the flags given go over them.
        if preset is not None or config_file:
            raise ConfigError("--resume", "continues a run with its own settings: --preset and --config do not apply")
        config = resumed_config(resume, PRESETS[DEFAULT_PRESET]())
    else:
        config = PRESETS[preset or DEFAULT_PRESET]()
    if config_file:
        config = load_config_file(config_file, config)
    given = {flags[dest]: value for dest, value in args.items() if value is not None}
    sections: dict[str, dict[str, Any]] = {}
    for flag, value in given.items():
        if flag.section != "rule.options":
            sections.setdefault(flag.section, {})[flag.name] = value
    rule_name = sections.pop("rule", {}).get("name")
    rule = config.rule
    if rule_name is not None and rule_name != rule.name:
        rule = RuleConfig(name=rule_name)  # another rule: its own defaults
    rule = _with_rule_options(rule, {flag: value for flag, value in given.items() if flag.section == "rule.options"})
    changes: dict[str, Any] = {"rule": rule, **sections.pop("", {})}
    for name, values in sections.items():
        section = getattr(config, name)
        if resume is not None and name == "execution" and values.get("executor") == "sequential":
            section = without_ray_settings(section, rule.rule_class)  # inherited, not given now
        changes[name] = replace(section, **values)
    return replace(config, **changes)
