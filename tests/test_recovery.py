"""A stage actor whose process dies (killed here by the pid it reports) is recreated where it was,
every stage goes back to the last checkpoint, the microbatches after it are done again, and the
run ends with the weights of a run nothing happened to. After --max-restarts the run stops with
one line that says how to resume it."""

from __future__ import annotations

import contextlib
import io

import ray
import torch
from helpers import assert_same_weights, run_to_end, small_config, tweak
from prometheus_client.parser import text_string_to_metric_families
from stops import KillStage, StopAt, log_counts, train_and_finish
from test_pipeline import DROPOUT_NET

import forwardflow.launch.train
from forwardflow.actors import ray_pipeline
from forwardflow.launch.build import build_run, ray_locations
from forwardflow.launch.cli import parse_config
from forwardflow.launch.resume import resumed_config
from forwardflow.launch.train import main
from forwardflow.monitoring.watch import free_port
from forwardflow.pipeline.presets import synthetic_small


def test_a_stage_killed_mid_run_is_recovered_and_the_weights_are_those_of_an_undisturbed_run(ray_cluster, tmp_path):
    out = tmp_path / "run"
    config = tweak(
        small_config("ray", model=DROPOUT_NET),
        schedule={"epochs": 3},
        output={"out": str(out), "checkpoint_every": 4},
        execution={"window": 8},  # the driver at most 8 ahead of the kill: the cut is in the first epoch
    )
    config = tweak(config, monitoring={"metrics_port": free_port(), "metrics_linger": 0.0, "metrics_interval": 0.05})
    reference = run_to_end(
        tweak(
            config,
            execution={"executor": "sequential", "window": None},
            output={"out": None, "checkpoint_every": None},
            monitoring={"metrics_port": 0},
        )
    )
    run = build_run(config)
    killer = KillStage(run, stage=1, count=14)
    run.extra_observers.append(killer)
    with run:
        first_locations = run.locations
        result = run.train()
        exposition = run.metrics.exporter.text().decode()
        new_pid = int(run.executor.locations[1]["pid"])
        # What summary.json reports is where the stages ran last, read again after the restart.
        assert run.locations is not first_locations and run.locations == ray_locations(run.executor)
    assert result.restarts == 1 and killer.killed and new_pid != killer.killed[0]
    ((back_to, reason),) = killer.rewinds
    assert reason.startswith("stage 1 was lost: its actor died")
    # Back to a cut (every 4 training microbatches, 16 and 2 evaluation ones per epoch), at most as
    # far as the driver had come: what came after it was done again.
    assert back_to in (4, 8, 12, 16, 18) and back_to <= killer.done_before[0]
    assert_same_weights(reference.weights, result.weights)
    assert [e.accuracies for e in result.evaluations] == [e.accuracies for e in reference.evaluations]
    restarts = next(f for f in text_string_to_metric_families(exposition) if f.name == "forwardflow_actor_restarts")
    assert [sample.value for sample in restarts.samples if sample.name.endswith("_total")] == [1.0]
    counts = log_counts(out)
    assert counts == sorted(counts), "the metrics log counts no microbatch twice"


def test_after_max_restarts_the_run_stops_in_one_line_giving_the_resume_command(ray_cluster, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = ["--preset", "synthetic", "--epochs", "2", "--no-progress"]
    argv = [*settings, "--checkpoint-every", "4", "--out", str(out)]

    def with_a_killer(config, *args, **kwargs):
        run = build_run(config, *args, **kwargs)
        run.extra_observers.append(KillStage(run, stage=0, count=10))
        return run

    monkeypatch.setattr(forwardflow.launch.train, "build_run", with_a_killer)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main([*argv, "--executor", "ray", "--max-restarts", "0"])
    lines = [
        line for line in err.getvalue().splitlines() if line.startswith("forwardflow:") and " on node " not in line
    ]
    assert status == 1 and len(lines) == 2, lines  # the run's first line (and its placement), then the one error
    assert "stage 0 was lost: its actor died" in lines[1] and "after 0 restart(s) (--max-restarts 0)" in lines[1]
    assert lines[1].endswith(f"continue with: python launch/train.py --resume {out}"), lines[1]
    monkeypatch.undo()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--resume", str(out), "--executor", "sequential"])
    assert status == 0, err.getvalue()
    expected = run_to_end(parse_config([*settings, "--executor", "sequential"]))
    assert_same_weights(expected.weights, torch.load(out / "weights.pt"))


def test_a_stage_lost_while_a_resumed_run_loads_its_checkpoint_is_a_restart(ray_cluster, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = tweak(small_config("sequential"), output={"out": str(out), "checkpoint_every": 4})
    reference = run_to_end(tweak(config, output={"out": None, "checkpoint_every": None}))
    stopped = build_run(config)
    stopped.extra_observers.append(StopAt(stopped, 10))
    assert train_and_finish(stopped).status == "interrupted"
    # Stage 1's actor dies once, after the restore has found every actor alive and before the
    # shards are loaded (its process killed, out of memory, ...).
    checked = ray_pipeline.lost_actors

    def one_death(actors):
        lost = checked(actors)
        if not killed:
            killed.append(ray.get(actors[1].location.remote())["pid"])
            ray.kill(actors[1])
        return lost

    killed: list[str] = []
    monkeypatch.setattr(ray_pipeline, "lost_actors", one_death)
    resumed = build_run(tweak(resumed_config(str(out), synthetic_small()), execution={"executor": "ray"}))
    result = train_and_finish(resumed)
    assert killed and result.restarts == 1 and result.status == "completed"
    assert_same_weights(reference.weights, result.weights)


def test_a_stage_lost_with_its_node_stops_at_the_last_checkpoint_in_one_line(ray_cluster, tmp_path, monkeypatch):
    # A stage's reservation is pinned to its node: with the node gone, its actor could never be
    # placed again, and waiting for it would hang the run.
    out = tmp_path / "run"
    argv = ["--preset", "synthetic", "--epochs", "2", "--no-progress", "--checkpoint-every", "4", "--out", str(out)]

    def with_a_killer(config, *args, **kwargs):
        run = build_run(config, *args, **kwargs)
        run.extra_observers.append(KillStage(run, stage=1, count=10))
        return run

    monkeypatch.setattr(forwardflow.launch.train, "build_run", with_a_killer)
    monkeypatch.setattr(ray_pipeline, "cluster_nodes", lambda: [])  # the cluster as recovery finds it
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main([*argv, "--executor", "ray"])
    error = err.getvalue().strip().splitlines()[-1]
    assert status == 1 and error.startswith("forwardflow: error: stage 1 was lost with its node "), error
    assert error.endswith(f"continue with: python launch/train.py --resume {out}"), error
