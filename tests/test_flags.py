"""Settings that do not apply to the chosen executor or data, or need another one, are refused (exit 2, one
line) instead of being silently ignored; from the command line and from a config file alike, and
only when the user gave them (their defaults are "not given")."""

from __future__ import annotations

import pytest
import torch
from helpers import small_config, tweak

import forwardflow.actors.cluster
from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.launch.train import main
from forwardflow.pipeline.config import AUTO_WINDOW_MAX, DEFAULT_WINDOW, WINDOW_BUDGET_BYTES, OutputConfig, RuleConfig
from forwardflow.pipeline.validation import ConfigError

SEQUENTIAL = ["--preset", "synthetic", "--executor", "sequential", "--no-progress"]

REFUSED = [
    (["--address", "127.0.0.1:6379"], "--address", "applies to --executor ray only"),
    (["--placement", "spread"], "--placement", "applies to --executor ray only"),
    (["--window", "4"], "--window", "applies to --executor ray only"),
    (["--max-restarts", "1"], "--max-restarts", "applies to --executor ray only"),
    (["--ray-dashboard"], "--ray-dashboard", "applies to --executor ray only"),
    (["--checkpoint-every", "10"], "--checkpoint-every", "needs --out"),
    (["--keep-checkpoints", "1"], "--keep-checkpoints", "needs --out"),
    (["--shard-writer", "driver"], "--shard-writer", "needs --out"),
    (["--overwrite"], "--overwrite", "needs --out"),
    (["--resume", "/tmp/run"], "--resume", "--preset and --config do not apply"),
    (["--update-every", "4"], "--update-every", "applies to sequence data only"),
    (["--loss-steps", "last"], "--loss-steps", "applies to sequence data only"),
    (["--sequence-length", "50"], "--sequence-length", "applies to --dataset adding only"),
]


@pytest.mark.parametrize("flags, where, message", REFUSED, ids=[" ".join(case[0]) for case in REFUSED])
def test_a_flag_that_does_not_apply_is_refused_in_one_line(flags, where, message, capsys, monkeypatch):
    monkeypatch.setattr(forwardflow.actors.cluster, "connect", lambda *a: pytest.fail("Ray started"))
    assert main([*SEQUENTIAL, *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"forwardflow: error: {where}: ") and message in lines[0], lines


def test_the_same_check_covers_config_files(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[execution]\nexecutor = "sequential"\nplacement = "pack"\n')
    assert main(["--preset", "synthetic", "--config", str(path)]) == 2
    assert "--placement: applies to --executor ray only" in capsys.readouterr().err


def test_defaults_are_not_given_and_resolve_in_one_place():
    config = parse_config(SEQUENTIAL)  # no Ray flag given: nothing to refuse
    assert config.execution.window is None and config.execution.pipeline_window == DEFAULT_WINDOW
    assert config.execution.placement_strategy == "pack" and config.execution.restart_limit == 3
    assert parse_config([*SEQUENTIAL[:-3], "--window", "4"]).execution.pipeline_window == 4


def test_the_default_ray_window_holds_as_many_hand_offs_as_the_budget_allows():
    execution = parse_config([]).execution
    assert execution.ray_window(WINDOW_BUDGET_BYTES // 12, sets_a_delay=False) == 12
    assert execution.ray_window(1, sets_a_delay=False) == AUTO_WINDOW_MAX  # a tiny net: the most
    assert execution.ray_window(WINDOW_BUDGET_BYTES, sets_a_delay=False) == DEFAULT_WINDOW  # a big one: the fewest
    assert execution.ray_window(1, sets_a_delay=True) == DEFAULT_WINDOW  # efp's delay does not move
    assert parse_config(["--window", "5"]).execution.ray_window(1, sets_a_delay=False) == 5
    # Without --window, a larger call is allowed, and the window holds one.
    assert parse_config(["--microbatches-per-call", "40"]).execution.ray_window(1, sets_a_delay=False) == 40
    with pytest.raises(ConfigError, match=r"--microbatches-per-call: must be at most --window \(8, rule efp"):
        parse_config(["--preset", "mnist-efp", "--microbatches-per-call", "9"])


def test_window_applies_to_a_sequential_run_of_a_rule_whose_feedback_loop_it_sets():
    config = tweak(small_config(rule=RuleConfig("efp")), execution={"window": 4})
    assert config.execution.pipeline_window == 4
    with pytest.raises(ConfigError, match="--window: applies to --executor ray only"):
        tweak(small_config(), execution={"window": 4})


def test_the_ray_dashboard_is_for_a_local_ray_only():
    with pytest.raises(ConfigError, match="--ray-dashboard: applies to a local Ray only"):
        parse_config(["--executor", "ray", "--ray-dashboard", "--address", "10.0.0.1:6379"])


def test_resume_continues_a_run_in_its_own_directory():
    assert OutputConfig(resume="runs/a").out == "runs/a"
    with pytest.raises(ConfigError, match="--resume: continues the run in its own directory"):
        OutputConfig(out="runs/b", resume="runs/a")
    with pytest.raises(ConfigError, match="--overwrite: replaces a run; --resume continues one"):
        OutputConfig(resume="runs/a", overwrite=True)


def test_under_ray_job_submit_the_device_is_the_clusters_not_this_machines(monkeypatch):
    # `ray job submit` sets RAY_ADDRESS: the stages run on the cluster's GPUs, which the driver's
    # machine need not have; the placement plan checks them once Ray is joined.
    argv = ["--preset", "synthetic", "--executor", "ray", "--device", "cuda"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device: 'cuda' does not exist here"):
            build_run(parse_config(argv))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert build_run(parse_config(argv)).config.execution.device == "cuda"
