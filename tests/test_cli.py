"""The command line generated from the config tree, config files and reruns from summary.json, and
bad input: one line naming the flag (or file) and what is allowed, exit status 2, before any actor
starts, and nothing written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import assert_same_weights

import forwardflow.actors.cluster
from forwardflow.launch.cli import build_parser, parse_config
from forwardflow.launch.train import main
from forwardflow.pipeline.config_files import config_to_dict


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends


BAD_INPUTS = [
    (["--dataset", "imagenet"], "--dataset", "mnist, fashion-mnist, cifar10, synthetic"),
    (["--rule", "magic"], "--rule", "sigprop"),
    (["--preset", "huge"], "--preset", "mnist-fc"),
    (["--stages", "9"], "--stages", "between 1 and 3"),
    (["--stages", "-1"], "--stages", "between 0 and 1024"),
    (["--batch-size", "0"], "--batch-size", "between 1 and 65536"),
    (["--epochs", "0"], "--epochs", "between 1 and 10000"),
    (["--epochs", "two"], "--epochs", "invalid int value"),
    (["--lr", "-0.1"], "--lr", "(0, 10]"),
    (["--lr", "nan"], "--lr", "must be a number"),
    (["--divergence-factor", "0.5"], "--divergence-factor", "0 (off) or more than 1"),
    (["--temperature", "1e-40"], "--temperature", "0 (the default) or at least 1e-06"),
    (["--device", "tpu"], "--device", "auto, cpu, cuda, cuda:N"),
    (["--device", "cuda:7", "--dataset", "synthetic"], "--device", "does not exist"),
    (["--threads", "0"], "--threads", "between 1 and 256"),
    (["--metrics-interval", "0"], "--metrics-interval", "between 0.05 and 3600"),
    (["--data-dir", "/nonexistent/forwardflow"], "--data-dir", "no mnist files"),
    (["--dataset", "cifar10", "--data-dir", "/tmp"], "--data-dir", "CIFAR-10 python batches"),
    (["--dataset", "synthetic", "--address", f"127.0.0.1:{closed_port()}"], "--address", "no Ray cluster answers"),
    (["--dataset", "synthetic", "--address", "nowhere"], "--address", "HOST:PORT"),
    (["--dataset", "synthetic", "--address", "127.0.0.1:abc"], "--address", "HOST:PORT"),
    (["--dataset", "synthetic", "--address", "127.0.0.1:99999"], "--address", "HOST:PORT"),
    (["--config", "/nonexistent/run.toml"], "--config", "cannot read"),
    (["--no-such-flag"], "--no-such-flag", "unknown flag"),
    (["--microbatch", "512"], "--microbatch", "unknown flag"),  # a prefix is not an abbreviation
]


@pytest.mark.parametrize("argv, field, allowed", BAD_INPUTS, ids=[" ".join(case[0]) for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_before_any_actor(argv, field, allowed, tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(forwardflow.actors.cluster, "connect", no_ray)
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"forwardflow: error: {field}") and allowed in lines[0], lines[0]
    assert not out.exists(), "nothing may be written for bad input"


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["--dataset", "synthetic", "--out", str(target)]) == 2
    assert "--out" in capsys.readouterr().err and target.read_text() == "keep me"


@pytest.mark.parametrize(
    "text, where",
    [
        ("[schedule]\nbatchsize = 5\n", "schedule.batchsize: unknown setting"),
        ('[schedule]\nbatch_size = "many"\n', "--batch-size: must be an integer"),
        ('[rule]\nname = "ff"\n[rule.options]\nloss = "per-class"\n', "rule.options.loss: unknown setting"),
        ('[model]\nblocks = [{kind = "linear"}]\n', "model.blocks: a linear block needs a width"),
        ('[model]\nblocks = [{kind = "flatten"}, {width = 16}]\n', "model.blocks[1].kind: is required: one of"),
        ("[model]\nblocks = [1]\n", "model.blocks[0]: must be a table of settings"),
        ("[model]\nsplit = [true]\n", "model.split: must list at least 1 layer per stage"),
        ('[rule]\nname = ["sigprop"]\n', "--rule: ['sigprop'] is not one of"),
        ("epochs = [", "is not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_setting(tmp_path, capsys, text, where):
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert main(["--config", str(path), "--dataset", "synthetic"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (len(lines) == 1 and lines[0].startswith(f"forwardflow: error: --config: {path}")) or "TOML" in lines[0]
    assert where in lines[0], lines[0]


def test_every_flag_has_help_and_shows_its_default():
    parser, flags = build_parser()
    text = parser.format_help()
    for flag in flags.values():
        assert flag.flag in text
    for action in parser._actions:
        if action.dest in flags:
            assert action.help and action.help.strip(), action.dest
    for shown in (
        "--epochs EPOCHS",
        "(default: 8)",
        "--seed SEED",
        "(default: 0)",
        "(default: 512)",
        "(default: 0.001)",
    ):
        assert shown in text


def test_command_line_config_file_and_summary_rerun_train_identical_weights(tmp_path):
    flags = [
        "--preset",
        "synthetic",
        "--executor",
        "sequential",
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--lr",
        "0.003",
        "--positives",
        "one",
        "--no-progress",
    ]
    assert main([*flags, "--out", str(tmp_path / "cli")]) == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["config"] == config_to_dict(parse_config([*flags, "--out", str(tmp_path / "cli")]))
    # The same settings as a TOML file (only what differs from the preset), and the summary itself.
    (tmp_path / "run.toml").write_text(
        "[schedule]\nepochs = 2\n[optim]\nlr = 0.003\n[rule.options]\n"
        'positives = "one"\n[execution]\nexecutor = "sequential"\ndevice = "cpu"\n'
    )
    assert (
        main(
            [
                "--preset",
                "synthetic",
                "--config",
                str(tmp_path / "run.toml"),
                "--no-progress",
                "--out",
                str(tmp_path / "toml"),
            ]
        )
        == 0
    )
    assert main(["--config", str(tmp_path / "cli" / "summary.json"), "--out", str(tmp_path / "rerun")]) == 0
    weights = {name: torch.load(tmp_path / name / "weights.pt") for name in ("cli", "toml", "rerun")}
    assert_same_weights(weights["cli"], weights["toml"])
    assert_same_weights(weights["cli"], weights["rerun"])
    rerun = json.loads((tmp_path / "rerun" / "summary.json").read_text())
    assert rerun["config"]["optim"]["lr"] == 0.003 and rerun["config"]["rule"]["options"]["positives"] == "one"


def test_a_rerun_from_a_summary_neither_replaces_another_run_nor_resumes(tmp_path):
    short = ["--preset", "synthetic", "--executor", "sequential", "--epochs", "1", "--no-progress"]
    assert main([*short, "--out", str(tmp_path / "a"), "--overwrite"]) == 0
    assert main([*short, "--out", str(tmp_path / "b"), "--seed", "7"]) == 0
    kept = (tmp_path / "b" / "summary.json").read_text()
    # The summary of a run made with --overwrite: the rerun into b must not replace b's run.
    assert main(["--config", str(tmp_path / "a" / "summary.json"), "--out", str(tmp_path / "b")]) == 2
    assert (tmp_path / "b" / "summary.json").read_text() == kept


def test_sequential_run_writes_the_documented_summary(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "--preset",
                "synthetic",
                "--executor",
                "sequential",
                "--device",
                "cpu",
                "--epochs",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "run_id",
        "dataset",
        "rule",
        "model",
        "epochs",
        "prediction",
        "predictions",
        "test_accuracy",
        "test_accuracies",
        "train_samples_per_s",
        "wall_s",
        "evaluations",
        "stages",
        "config",
    ):
        assert key in summary, key
    assert summary["dataset"] == "synthetic" and summary["rule"] == "sigprop" and summary["epochs"] == 2
    assert summary["prediction"] == "nearest_target"
    assert summary["test_accuracy"] == summary["test_accuracies"]["nearest_target"] > 0.5
    assert summary["evaluations"][-1]["test_accuracies"] == summary["test_accuracies"]
    assert len(summary["stages"]) == 2
    for stage in summary["stages"]:
        assert {"device", "precision", "samples", "busy_fraction", "mean_loss"} <= stage.keys()
        assert stage["precision"] == "float32"  # no --bf16
        assert stage["device"] == "cpu" and stage["samples"] == 2 * 1024 and 0 < stage["busy_fraction"] <= 1
    assert (out / "weights.pt").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"


@pytest.mark.parametrize(
    "rule, primary, label",
    [("ff", "scan", "label scan"), ("local", "local_head", "last local head"), ("bp", "head", "output head")],
)
def test_the_rules_own_prediction_is_the_test_accuracy_and_the_first_column(tmp_path, capsys, rule, primary, label):
    out = tmp_path / "run"
    assert (
        main(
            [
                "--preset",
                "synthetic",
                "--rule",
                rule,
                "--executor",
                "sequential",
                "--device",
                "cpu",
                "--epochs",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prediction"] == primary
    assert summary["test_accuracy"] == summary["evaluations"][-1]["test_accuracies"][primary]
    header = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("epoch"))
    assert header.split("  ")[1].strip() == label


def test_cluster_yaml_passes_rays_own_schema():
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).parents[1] / "launch" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a key Ray does not know
    assert config["provider"]["type"] == "local"
    assert any("launch/setup.sh" in command for command in config["setup_commands"])
    # Token authentication really on: the token travels to every node, and Ray starts only with it.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in command for command in starts)


# launch/train.py's main in a fresh process that starts its own local Ray, then Ray's view of token
# authentication in that process.
RAY_RUN = r"""
import os, sys
from forwardflow.launch.train import main
status = main(sys.argv[1:])
from ray._raylet import AuthenticationMode, get_authentication_mode
print("auth", os.environ.get("RAY_AUTH_MODE"), get_authentication_mode() == AuthenticationMode.TOKEN)
sys.exit(status)
"""


def test_a_ray_run_prints_only_its_own_lines_and_keeps_token_authentication(tmp_path):
    # Ray announces at every start that token authentication is on and that it started a local
    # instance; the launcher keeps those notes (nothing to act on) off stderr, not authentication.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    argv = ["--preset", "synthetic", "--executor", "ray", "--epochs", "1", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", RAY_RUN, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("forwardflow: ") for line in lines), done.stderr
    assert "auth token True" in done.stdout
