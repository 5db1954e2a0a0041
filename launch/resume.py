"""``--resume DIR``: continue the run in DIR from its newest complete checkpoint, with its settings.

The command line starts from the checkpoint's resolved config instead of a preset, so that
``--resume DIR`` alone continues the run; flags given beside it may change how the run is carried
out (executor, devices, threads, monitoring, checkpoint cadence) but nothing that decides what is
computed (data, model, rule, optimizer, schedule, seed): the builder refuses those, whatever the
config came from, so that the resumed run ends with the weights the uninterrupted one would have.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from forwardflow.pipeline.checkpoint import CHECKPOINTS, CheckpointError, Manifest, complete_checkpoints, verify
from forwardflow.pipeline.config import RAY_ONLY, ExecutionConfig, RunConfig
from forwardflow.pipeline.config_files import config_from_dict, config_to_dict
from forwardflow.pipeline.rules.base import Rule
from forwardflow.pipeline.validation import ConfigError

# What decides the computation, section by section. Where the files are (data_dir) and where the
# first stage keeps them (placement: device memory or pinned host memory) change no number.
LEARNING = ("data", "model", "rule", "optim", "schedule")
LOCATIONS = {"data_dir", "placement"}


def newest_checkpoint(directory: str) -> tuple[Path, Manifest]:
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError("--resume", f"{directory} is not a directory")
    summary = root / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text()).get("status", "completed")
        except (OSError, ValueError):
            status = None
        if status == "completed":
            raise ConfigError("--resume", f"the run in {directory} has finished (see its summary.json)")
    found = complete_checkpoints(root / CHECKPOINTS)
    if not found:
        raise ConfigError(
            "--resume", f"{directory} holds no complete checkpoint (a run with --out writes one at each epoch end)"
        )
    return found[-1]


def resumed_config(directory: str, base: RunConfig) -> RunConfig:
    """The config of the run in ``directory``, as its newest checkpoint recorded it, resuming."""
    _, manifest = newest_checkpoint(directory)
    config = config_from_dict(manifest.config, base)
    output = replace(config.output, out=None, resume=directory, overwrite=False)
    return replace(config, output=output)


def without_ray_settings(execution: ExecutionConfig, rule: type[Rule]) -> ExecutionConfig:
    """A run trained on Ray and resumed sequentially: the Ray-only settings it was given then do
    not apply now (the window stays for a rule whose feedback loop it sets)."""
    window = execution.window if rule.uses_window else None
    unset: dict[str, Any] = dict.fromkeys(RAY_ONLY)
    return replace(execution, **unset, ray_dashboard=False, window=window)


def _difference(config: RunConfig, saved: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting that decides the computation and differs: (flag, saved, given)."""
    current = config_to_dict(config)
    if current["seed"] != saved["seed"]:
        return "--seed", saved["seed"], current["seed"]
    for section in LEARNING:
        owner = getattr(config, section)
        for name, value in current[section].items():
            old = saved[section].get(name)
            if value == old or name in LOCATIONS:
                continue
            if section == "rule" and name == "options" and config.rule.options is not None:
                option = next(key for key in value if value[key] != (old or {}).get(key))
                return config.rule.options.flag(option), (old or {}).get(option), value[option]
            return (f"model.{name}" if name == "blocks" else owner.flag(name)), old, value
    if config.rule.rule_class.uses_window:
        old_window = saved["execution"]["window"] or config.execution.pipeline_window
        if old_window != config.execution.pipeline_window:
            return "--window", old_window, config.execution.pipeline_window
    return None


def resume_point(config: RunConfig) -> tuple[Path, Manifest]:
    """The checkpoint ``config`` resumes from, every file's checksum verified, and its settings
    the same as the ones the run was trained with."""
    assert config.output.resume is not None
    directory = config.output.resume
    folder, manifest = newest_checkpoint(directory)
    try:
        verify(folder, manifest)
    except CheckpointError as error:
        raise ConfigError("--resume", str(error)) from None
    changed = _difference(config, manifest.config)
    if changed is not None:
        flag, old, new = changed
        raise ConfigError(
            flag, f"the run in {directory} was trained with {old!r} (given: {new!r}); --resume keeps its settings"
        )
    return folder, manifest
