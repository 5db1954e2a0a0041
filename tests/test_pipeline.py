"""The Ray pipeline against the sequential runner: same weights bit for bit, stream order kept,
learning through actors, and errors surfacing from actors."""

from dataclasses import replace

import pytest
import torch

from actors.placement import plan_placement
from actors.ray_pipeline import RayPipeline
from pipeline.config import BlockSpec, ModelConfig
from pipeline.messages import NonFiniteLossError
from pipeline.runner import SequentialRunner
from pipeline.training import train

CPU_PLACEMENT = {"CPU": 2.0}


def ray_pipeline(setups, window):
    return RayPipeline(setups, plan_placement(len(setups), "cpu", CPU_PLACEMENT), window=window)


def assert_same_weights(left, right):
    assert len(left) == len(right)
    for stage, (a, b) in enumerate(zip(left, right)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"stage {stage} {name} differs"


def test_pipelined_and_sequential_runs_end_with_bit_identical_weights(ray_cluster, tiny):
    # Dropout and batch statistics included: every random draw belongs to its stage.
    model = ModelConfig("fc-dropout", (BlockSpec("flatten"), BlockSpec("linear", 24), BlockSpec("relu"),
                                       BlockSpec("dropout", p=0.2), BlockSpec("linear", 24), BlockSpec("relu"),
                                       BlockSpec("layernorm"), BlockSpec("linear", 16), BlockSpec("tanh")))
    _, _, schedule, setups = tiny(model=model)
    sequential = train(schedule, SequentialRunner(setups))
    pipeline = ray_pipeline(setups, window=6)
    try:
        pipelined = train(schedule, pipeline)
    finally:
        pipeline.close()
    assert_same_weights(sequential.weights, pipelined.weights)
    # The weights did move: equality is not the trivial one of two untrained nets.
    untrained = SequentialRunner(setups).state_dicts()
    assert any(not torch.equal(untrained[0][k], sequential.weights[0][k]) for k in untrained[0])
    assert [e.accuracy for e in sequential.evaluations] == [e.accuracy for e in pipelined.evaluations]


def test_predictions_come_back_in_stream_order(ray_cluster, tiny):
    _, _, schedule, setups = tiny()
    pipeline = ray_pipeline(setups, window=4)
    seen = []
    try:
        for mb in schedule:
            pipeline.submit(mb)
            seen += [p.index for p in pipeline.completed()]
        seen += [p.index for p in pipeline.completed(wait=True)]
    finally:
        pipeline.close()
    assert seen == list(range(len(schedule)))


def test_a_short_ray_run_learns_the_synthetic_set(ray_cluster, tiny):
    _, dataset, schedule, setups = tiny()
    pipeline = ray_pipeline(setups, window=8)
    try:
        result = train(schedule, pipeline)
    finally:
        pipeline.close()
    chance = 1 / dataset.num_classes
    final = result.evaluations[-1]
    assert final.accuracy > chance + 0.5 and final.accuracy_head > chance + 0.5
    assert [s.samples for s in result.stages] == [len(dataset.train_y) * 2] * 3


def test_a_non_finite_loss_in_an_actor_stops_the_run_naming_stage_and_microbatch(ray_cluster, tiny):
    _, dataset, schedule, setups = tiny()
    dataset.train_x[:] = float("nan")
    pipeline = ray_pipeline(setups, window=4)
    try:
        with pytest.raises(NonFiniteLossError) as caught:
            train(schedule, pipeline)
    finally:
        pipeline.close()
    assert caught.value.stage == 0 and caught.value.microbatch == 0


def test_placement_shares_cpus_among_more_stages_than_cores():
    placement = plan_placement(4, "cpu", {"CPU": 2.0})
    assert placement.device == "cpu" and placement.num_cpus == 0.5 and placement.num_gpus == 0
    gpu = plan_placement(4, "auto", {"CPU": 16.0, "GPU": 2.0})
    assert gpu.device == "cuda" and gpu.num_gpus == 0.5 and gpu.num_cpus == 1.0
