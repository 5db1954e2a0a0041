"""A RunConfig to and from JSON values and files: summary.json's ``config``, and ``--config FILE``
(TOML or JSON, or a run's summary.json), whose settings override a preset's. Every problem is a
ConfigError naming the setting, or the file."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from forwardflow.pipeline.config import RuleConfig, RunConfig
from forwardflow.pipeline.model import BLOCK_KINDS, BlockSpec, ModelConfig
from forwardflow.pipeline.rules.registry import RULES
from forwardflow.pipeline.validation import ConfigError, Section


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The whole tree as JSON values (what summary.json keeps under ``config``)."""
    return json.loads(json.dumps(asdict(config)))


def _section_from_dict(base: Section, data: Any, path: str) -> Section:
    """``base`` with the values of ``data`` (a mapping, possibly partial) put in; checked."""
    if not isinstance(data, dict):
        raise ConfigError(path.rstrip(".") or "config", f"must be a table of settings (got {data!r})")
    known = {item.name for item in fields(base)}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{path}{key}", f"unknown setting; {path or 'the top level'} has {', '.join(sorted(known))}"
            )
    changes: dict[str, Any] = {}
    for key, value in data.items():
        current = getattr(base, key)
        if isinstance(base, RuleConfig) and key == "options":
            continue  # below, once the rule's name is known
        if is_dataclass(current) and isinstance(current, Section):
            changes[key] = _section_from_dict(current, value, f"{path}{key}.")
        elif isinstance(base, ModelConfig) and key == "split":
            if not isinstance(value, list):
                raise ConfigError(f"{path}split", "must be a list of layers per stage")
            changes[key] = tuple(value)
        elif isinstance(base, ModelConfig) and key == "blocks":
            if not isinstance(value, list):
                raise ConfigError(f"{path}blocks", "must be a list of blocks")
            for number, block in enumerate(value):
                # kind has no default: a block read on top of a placeholder must name its own.
                if isinstance(block, dict) and "kind" not in block:
                    raise ConfigError(
                        f"{path}blocks[{number}].kind", f"is required: one of {', '.join(BLOCK_KINDS)} (got {block!r})"
                    )
            changes[key] = tuple(
                _section_from_dict(BlockSpec(kind="relu"), block, f"{path}blocks[{number}].")
                for number, block in enumerate(value)
            )
        else:
            changes[key] = value
    if isinstance(base, RuleConfig):
        name = changes.get("name", base.name)
        if not isinstance(name, str) or name not in RULES:
            raise ConfigError("--rule", f"{name!r} is not one of {', '.join(RULES)}")
        options = base.options if name == base.name and base.options is not None else RULES[name].Options()
        changes["options"] = _section_from_dict(options, data.get("options", {}), f"{path}options.")
    try:
        return replace(base, **changes)  # type: ignore[type-var]
    except TypeError as error:  # a required field missing from a block
        raise ConfigError(path.rstrip(".") or "config", str(error)) from None


def config_from_dict(data: dict[str, Any], base: RunConfig) -> RunConfig:
    """``base`` (a preset) with the settings of ``data`` put in. Accepts a run's summary.json,
    whose resolved config is under ``config``."""
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
        if isinstance(data.get("output"), dict):
            # What the command that made that run did to its directory (replace another run,
            # continue its own) is no setting of the run: a rerun does neither unless told now.
            data = {**data, "output": {k: v for k, v in data["output"].items() if k not in ("overwrite", "resume")}}
    result = _section_from_dict(base, data, "")
    assert isinstance(result, RunConfig)
    return result


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML or JSON file; ConfigError (naming the file) when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("--config", f"cannot read {path} ({getattr(error, 'strerror', None) or error})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError("--config", f"{path} is not valid {kind} ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a table of settings")
    return data


def load_config_file(path: str | Path, base: RunConfig) -> RunConfig:
    try:
        return config_from_dict(read_config_file(path), base)
    except ConfigError as error:
        if error.where == "--config":
            raise
        raise ConfigError("--config", f"{path}: {error}") from None
