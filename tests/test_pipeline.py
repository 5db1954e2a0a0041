"""The Ray pipeline against the sequential runner: same weights and same per-sample predictions bit
for bit, stream order kept, learning through actors, and errors surfacing from actors."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import assert_executors_agree, run_to_end, small_config, tweak
from test_rules import CONV, config_for

import forwardflow.actors.ray_pipeline
import forwardflow.pipeline.config
from forwardflow.actors.layer_actor import LayerActor
from forwardflow.actors.ray_pipeline import StageStartError
from forwardflow.launch.build import RayCalls, build_run
from forwardflow.pipeline.messages import NonFiniteLossError
from forwardflow.pipeline.model import BlockSpec, ModelConfig, hand_on_bytes
from forwardflow.pipeline.runner import SequentialRunner

DROPOUT_NET = ModelConfig(
    "fc-dropout",
    (
        BlockSpec("flatten"),
        BlockSpec("linear", 24),
        BlockSpec("relu"),
        BlockSpec("dropout", p=0.2),
        BlockSpec("linear", 24),
        BlockSpec("relu"),
        BlockSpec("layernorm"),
        BlockSpec("linear", 16),
        BlockSpec("tanh"),
    ),
)


def test_the_ray_window_is_sized_from_the_hand_offs_the_stages_make(monkeypatch):
    # The estimate against the bytes the stages really hand on, for one microbatch.
    config = small_config()
    run = build_run(config)
    runner = SequentialRunner(run.setups, run.dataset)
    message = runner.source.read(next(iter(run.schedule)))
    batch, handed = message.size, 0
    for stage in runner.stages[:-1]:
        message = stage.step(message)
        handed += sum(tensor.nbytes for tensor in (message.inputs, message.targets))
    assert hand_on_bytes([setup.spec for setup in run.setups], batch, run.dataset.num_classes) == handed
    # A Ray run keeps as many as fit the budget in flight, a call for each stage and one more.
    monkeypatch.setattr(forwardflow.pipeline.config, "WINDOW_BUDGET_BYTES", 12 * handed)
    assert build_run(tweak(config, execution={"executor": "ray"})).calls == RayCalls(window=12, per_call=3)
    assert build_run(config).calls is None  # the sequential runner makes no calls


def test_pipelined_and_sequential_runs_agree_bit_for_bit(ray_cluster):
    # The README's condition: one torch thread per stage on both sides (the sequential runner's
    # process, each actor). Dropout and layer statistics included: every random draw belongs to
    # its stage.
    config = tweak(small_config(model=DROPOUT_NET), execution={"threads": 1})
    sequential = assert_executors_agree(config)
    # The weights did move: equality is not the trivial one of two untrained nets.
    built = build_run(config)
    untrained = SequentialRunner(built.setups, built.dataset).state_dicts()
    assert any(not torch.equal(untrained[0][k], sequential.weights[0][k]) for k in untrained[0])


def test_predictions_come_back_in_stream_order(ray_cluster):
    run = build_run(tweak(small_config("ray"), execution={"window": 4}))
    seen = []
    with run:
        for mb in run.schedule:
            run.executor.submit(mb)
            seen += [p.index for p in run.executor.completed()]
        seen += [p.index for p in run.executor.completed(wait=True)]
    assert seen == list(range(len(run.schedule)))


def test_a_short_ray_run_learns_the_synthetic_set(ray_cluster):
    run = build_run(small_config("ray"))
    with run:
        result = run.train()
    chance = 1 / run.dataset.num_classes
    final = result.evaluations[-1]
    assert final.accuracy > chance + 0.5 and final.accuracies["head"] > chance + 0.5
    assert [s.samples for s in result.stages] == [len(run.dataset.train_y) * 2] * 3


def test_a_non_finite_loss_in_an_actor_stops_the_run_naming_stage_and_microbatch(ray_cluster):
    run = build_run(tweak(small_config("ray"), execution={"window": 4}))
    run.dataset.train_x[:] = float("nan")
    with run, pytest.raises(NonFiniteLossError) as caught:
        run.train()
    assert caught.value.stage == 0 and caught.value.microbatch == 0


def test_executors_agree_with_augmentation_made_on_the_first_stage(ray_cluster):
    # Crops and flips are drawn by the schedule on the driver and applied where the first stage
    # keeps the data (its actor, or the sequential runner's process): the same images either way.
    config = tweak(config_for("sigprop", model=CONV, epochs=1), data={"augment": True, "train_limit": 256})
    augmented = assert_executors_agree(config)
    plain = run_to_end(tweak(config, data={"augment": False}))
    assert any(not torch.equal(plain.weights[0][k], augmented.weights[0][k]) for k in plain.weights[0])


def test_a_stage_that_cannot_be_built_stops_the_start_and_leaves_nothing_reserved(ray_cluster, monkeypatch):
    class StageThatCannotBeBuilt(LayerActor):  # defined here: the workers receive it by value
        def __init__(self, setup, *args):
            if setup.spec.index == 2:  # a GPU out of memory, a driver that fails, ...
                raise RuntimeError("no room for stage 2")
            super().__init__(setup, *args)

    broken = ray_cluster.remote(max_restarts=0, max_task_retries=0)(StageThatCannotBeBuilt)
    monkeypatch.setattr(forwardflow.actors.ray_pipeline, "layer_actor_class", lambda direct: broken)
    run = build_run(small_config("ray"))
    with pytest.raises(StageStartError, match=r"a stage could not start \(.*RuntimeError: no room for stage 2\)"):
        run.start()
    from ray.util import placement_group_table

    assert all(group["state"] == "REMOVED" for group in placement_group_table().values())
    # Every CPU is free again (the actors are killed, their bundles released): the next run starts.
    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("CPU") != ray_cluster.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(0.1)
