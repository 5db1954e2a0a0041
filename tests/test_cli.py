"""Bad input: one line naming the field and what is allowed, exit status 2, before any actor
starts, and nothing written."""

import socket

import pytest

import actors.cluster
from launch import train
from launch.cli import parse


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends


BAD_INPUTS = [
    (["--dataset", "imagenet"], "--dataset", "mnist, fashion-mnist, cifar10, synthetic"),
    (["--rule", "magic"], "--rule", "sigprop"),
    (["--preset", "huge"], "--preset", "mnist-fc"),
    (["--stages", "9"], "--stages", "between 1 and 3"),
    (["--stages", "0"], "--stages", "at least 1"),
    (["--batch-size", "0"], "--batch-size", "between 1 and 65536"),
    (["--epochs", "0"], "--epochs", "between 1 and 10000"),
    (["--epochs", "two"], "--epochs", "invalid int value"),
    (["--lr", "-0.1"], "--lr", "(0, 10]"),
    (["--lr", "nan"], "--lr", "(0, 10]"),
    (["--device", "tpu"], "--device", "auto, cpu, cuda, cuda:N"),
    (["--device", "cuda:7", "--dataset", "synthetic"], "--device", "does not exist"),
    (["--data-dir", "/nonexistent/forwardflow"], "--data-dir", "no mnist files"),
    (["--dataset", "cifar10", "--data-dir", "/tmp"], "--data-dir", "CIFAR-10 python batches"),
    (["--dataset", "synthetic", "--address", f"127.0.0.1:{closed_port()}"], "--address", "no Ray cluster answers"),
    (["--dataset", "synthetic", "--address", "nowhere"], "--address", "HOST:PORT"),
]


@pytest.mark.parametrize("argv, field, allowed", BAD_INPUTS, ids=[" ".join(case[0]) for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_before_any_actor(argv, field, allowed, tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(actors.cluster, "connect", no_ray)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        train.main(argv + ["--out", str(out), "--no-progress"])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"forwardflow: error: {field}") and allowed in lines[0], lines[0]
    assert not out.exists(), "nothing may be written for bad input"


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as caught:
        train.main(["--dataset", "synthetic", "--out", str(target)])
    assert caught.value.code == 2 and "--out" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_sequential_run_writes_the_documented_summary(tmp_path):
    import json

    out = tmp_path / "run"
    assert train.main(["--preset", "synthetic", "--executor", "sequential", "--epochs", "2",
                       "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("dataset", "rule", "model", "epochs", "test_accuracy", "test_accuracy_head",
                "train_samples_per_s", "wall_s", "stages"):
        assert key in summary, key
    assert summary["dataset"] == "synthetic" and summary["rule"] == "sigprop" and summary["epochs"] == 2
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert len(summary["stages"]) == 2
    for stage in summary["stages"]:
        assert {"device", "samples", "busy_fraction", "mean_loss"} <= stage.keys()
        assert stage["device"] == "cpu" and stage["samples"] == 2 * 1024 and 0 < stage["busy_fraction"] <= 1
    assert (out / "weights.pt").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_ff_run_reports_its_label_scan_as_the_test_accuracy_and_a_table_column(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert train.main(["--preset", "synthetic", "--rule", "ff", "--executor", "sequential", "--epochs", "1",
                       "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    last = summary["evaluations"][-1]
    assert summary["test_accuracy"] == last["test_accuracy_scan"]
    header = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("epoch"))
    assert header.split() == ["epoch", "test", "acc", "head", "acc", "scan", "acc", "wall", "s"]


def test_cluster_yaml_passes_rays_own_schema():
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).parents[1] / "launch" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a key Ray does not know
    assert config["provider"]["type"] == "local"
    assert any("launch/setup.sh" in command for command in config["setup_commands"])


def test_ff_preset_hard_negatives_can_be_turned_off_from_the_command_line():
    preset, _ = parse(["--preset", "mnist-ff"])
    random_negatives, _ = parse(["--preset", "mnist-ff", "--no-hard-negatives"])
    assert preset.rule.ff_hard_negatives and not random_negatives.rule.ff_hard_negatives
    assert random_negatives.optim == preset.optim and random_negatives.data == preset.data
