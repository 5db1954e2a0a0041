"""Locality: a stage's update touches only its own parameters, and no gradient crosses a stage
boundary. Evaluation microbatches change nothing."""

from dataclasses import replace

import pytest
import torch

from pipeline.config import BlockSpec, ModelConfig
from pipeline.messages import EVAL, TRAIN, Microbatch, NonFiniteLossError, Prediction
from pipeline.runner import SequentialRunner
from pipeline.stage import Stage


def weights(stage: Stage) -> dict[str, torch.Tensor]:
    return stage.state_dict()


def first_microbatch(schedule, phase=TRAIN) -> Microbatch:
    return next(mb for mb in schedule if mb.phase == phase)


def test_a_stage_update_changes_only_its_own_parameters(tiny):
    _, _, schedule, setups = tiny()
    runner = SequentialRunner(setups)
    mb = first_microbatch(schedule)
    handed = runner.stages[0].step(mb)  # stage 0 learns once; then freeze the picture
    before = [weights(stage) for stage in runner.stages]
    runner.stages[1].step(handed)
    after = [weights(stage) for stage in runner.stages]
    for index, (old, new) in enumerate(zip(before, after)):
        changed = [name for name in old if not torch.equal(old[name], new[name])]
        if index == 1:
            assert changed, "stage 1 should have learned from its own local loss"
        else:
            assert not changed, f"stage {index} changed when only stage 1 stepped: {changed}"


def test_no_gradient_crosses_a_stage_boundary(tiny):
    _, _, schedule, setups = tiny()
    runner = SequentialRunner(setups)
    mb = first_microbatch(schedule)
    handed = runner.stages[0].step(mb)
    assert handed.inputs.grad_fn is None and not handed.inputs.requires_grad
    assert handed.targets.grad_fn is None and not handed.targets.requires_grad
    # Even an input that asks for a gradient gets none back from the stage's update.
    probe = replace(handed, inputs=handed.inputs.clone().requires_grad_(True),
                    targets=handed.targets.clone().requires_grad_(True))
    runner.stages[1].step(probe)
    assert probe.inputs.grad is None and probe.targets.grad is None


def test_evaluation_microbatches_change_no_weight_nor_normalisation_statistics(tiny):
    conv = ModelConfig("conv-tiny", (BlockSpec("conv", 4), BlockSpec("batchnorm"), BlockSpec("relu"),
                                     BlockSpec("maxpool", kernel_size=2), BlockSpec("flatten"),
                                     BlockSpec("linear", 8), BlockSpec("relu")))
    _, _, schedule, setups = tiny(model=conv)
    runner = SequentialRunner(setups)
    runner.submit(first_microbatch(schedule, TRAIN))  # some state to preserve
    before = [weights(stage) for stage in runner.stages]
    result = None
    for stage in runner.stages:
        result = stage.step(first_microbatch(schedule, EVAL) if result is None else result)
    assert isinstance(result, Prediction) and result.phase == EVAL
    for old, new in zip(before, [weights(stage) for stage in runner.stages]):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[name], new[name]) for name in old)


def test_a_non_finite_loss_stops_the_stage_and_names_it(tiny):
    _, dataset, schedule, setups = tiny()
    runner = SequentialRunner(setups)
    mb = first_microbatch(schedule)
    mb.inputs[0, 0, 0, 0] = float("nan")
    before = weights(runner.stages[0])
    with pytest.raises(NonFiniteLossError) as caught:
        runner.submit(mb)
    assert caught.value.stage == 0 and caught.value.microbatch == mb.index
    assert "stage 0" in str(caught.value) and f"microbatch {mb.index}" in str(caught.value)
    after = weights(runner.stages[0])
    assert all(torch.equal(before[name], after[name]) for name in before), "a NaN loss must not reach the weights"


def test_a_stage_refuses_microbatches_out_of_stream_order(tiny):
    _, _, schedule, setups = tiny()
    stream = iter(schedule)
    first, second = next(stream), next(stream)
    stage = Stage(setups[0])
    stage.step(second)
    with pytest.raises(RuntimeError, match="arrived after"):
        stage.step(first)
