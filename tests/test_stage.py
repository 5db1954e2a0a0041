"""Locality: a stage's update touches only its own parameters, and no gradient crosses a stage
boundary. Evaluation microbatches change nothing."""

from dataclasses import replace

import pytest
import torch

from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, NonFiniteLossError, Prediction
from forwardflow.pipeline.model import BlockSpec, ModelConfig
from forwardflow.pipeline.runner import SequentialRunner
from forwardflow.pipeline.stage import Stage


def weights(stage: Stage) -> dict[str, torch.Tensor]:
    return stage.state_dict()


def first_microbatch(schedule, phase=TRAIN) -> Microbatch:
    return next(mb for mb in schedule if mb.phase == phase)


def gradients(stage: Stage) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in stage.blocks.parameters()]


def test_a_stage_update_reaches_only_its_own_parameters(tiny):
    run = tiny()
    runner = SequentialRunner(run.setups)
    handed = runner.stages[0].step(first_microbatch(run.schedule))  # stage 0 learns once
    before = weights(runner.stages[1])
    stage0_gradients = gradients(runner.stages[0])
    runner.stages[1].step(handed)
    after = weights(runner.stages[1])
    assert any(not torch.equal(before[name], after[name]) for name in before), "stage 1 did not learn"
    # Stage 1's backward pass left stage 0's gradients exactly as stage 0's own update left them:
    # no gradient reached upstream through the hand-on.
    for old, new in zip(stage0_gradients, gradients(runner.stages[0])):
        assert old is not None and new is not None and torch.equal(old, new)


def test_no_gradient_crosses_a_stage_boundary(tiny):
    run = tiny()
    schedule, setups = run.schedule, run.setups
    runner = SequentialRunner(setups)
    mb = first_microbatch(schedule)
    handed = runner.stages[0].step(mb)
    assert handed.inputs.grad_fn is None and not handed.inputs.requires_grad
    assert handed.targets.grad_fn is None and not handed.targets.requires_grad
    # Even an input that asks for a gradient gets none back from the stage's update.
    probe = replace(
        handed, inputs=handed.inputs.clone().requires_grad_(True), targets=handed.targets.clone().requires_grad_(True)
    )
    runner.stages[1].step(probe)
    assert probe.inputs.grad is None and probe.targets.grad is None


def test_evaluation_microbatches_change_no_weight_nor_normalisation_statistics(tiny):
    conv = ModelConfig(
        "conv-tiny",
        (
            BlockSpec("conv", 4),
            BlockSpec("batchnorm"),
            BlockSpec("relu"),
            BlockSpec("maxpool", kernel_size=2),
            BlockSpec("flatten"),
            BlockSpec("linear", 8),
            BlockSpec("relu"),
        ),
    )
    run = tiny(model=conv)
    schedule, setups = run.schedule, run.setups
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
    run = tiny()
    schedule, setups = run.schedule, run.setups
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
    run = tiny()
    schedule, setups = run.schedule, run.setups
    stream = iter(schedule)
    first, second = next(stream), next(stream)
    stage = Stage(setups[0])
    stage.step(second)
    with pytest.raises(RuntimeError, match="arrived after"):
        stage.step(first)
