"""Locality: a stage's update touches only its own parameters, and no gradient crosses a stage
boundary. Evaluation microbatches change nothing."""

from collections import Counter
from dataclasses import replace

import pytest
import torch
from helpers import small_config
from test_rules import RULE_NAMES, config_for

from forwardflow.launch.build import build_run
from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, NonFiniteLossError, Prediction
from forwardflow.pipeline.model import BlockSpec, ModelConfig
from forwardflow.pipeline.presets import fc_model
from forwardflow.pipeline.rules.sigprop import SigPropOptions
from forwardflow.pipeline.runner import SequentialRunner
from forwardflow.pipeline.stage import Stage


def weights(stage: Stage) -> dict[str, torch.Tensor]:
    return stage.state_dict()


def first_microbatch(schedule, phase=TRAIN) -> Microbatch:
    return schedule.read(next(plan for plan in schedule if plan.phase == phase))


def gradients(stage: Stage) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in stage.blocks.parameters()]


def test_a_stage_update_reaches_only_its_own_parameters(tiny):
    run = tiny()
    runner = SequentialRunner(run.setups, run.dataset)
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


def test_with_a_loss_per_layer_one_stage_step_updates_every_layer(tiny):
    # The rule runs the earlier layers' backward passes itself (to free their activations); the
    # stage must keep those gradients, not clear them between the rule and its own backward pass.
    model = replace(fc_model((24, 24, 16, 16), name="fc-tiny4"), stages=2)
    run = tiny(model=model, rule=RuleConfig("sigprop", SigPropOptions(loss_at="layer")))
    stage = SequentialRunner(run.setups, run.dataset).stages[0]
    before = weights(stage)
    stage.step(first_microbatch(run.schedule))
    after = weights(stage)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    layers = {name for name, weight in before.items() if name.startswith("blocks.") and weight.dim() == 2}
    assert len(layers) == 2 and layers <= moved  # both linear layers


def test_no_gradient_crosses_a_stage_boundary(tiny):
    run = tiny()
    schedule, setups = run.schedule, run.setups
    runner = SequentialRunner(setups, run.dataset)
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
    runner = SequentialRunner(setups, run.dataset)
    runner.submit(next(iter(schedule)))  # some state to preserve (the first plan is a training one)
    before = [weights(stage) for stage in runner.stages]
    result = None
    for stage in runner.stages:
        result = stage.step(first_microbatch(schedule, EVAL) if result is None else result)
    assert isinstance(result, Prediction) and result.phase == EVAL
    for old, new in zip(before, [weights(stage) for stage in runner.stages]):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[name], new[name]) for name in old)


def test_the_last_stage_predicts_classes_for_evaluation_only(tiny):
    # Only evaluation is scored: a training microbatch comes back with its place and labels, and
    # without the output head's and the nearest target's classes, which nothing would read.
    run = tiny()
    runner = SequentialRunner(run.setups, run.dataset)
    reports = {}
    for plan in run.schedule:
        runner.submit(plan)
        for prediction in runner.completed():
            reports.setdefault(prediction.phase, prediction)
        if len(reports) == 2:
            break
    train, evaluation = reports[TRAIN], reports[EVAL]
    assert train.outputs == {} and train.size == run.config.schedule.batch_size
    assert evaluation.outputs.keys() == {"nearest_target", "head"}


def parameters(stage: Stage) -> list[torch.Tensor]:
    return [p.detach().clone() for p in list(stage.blocks.parameters()) + list(stage.rule.parameters())]


def test_a_non_finite_loss_stops_the_stage_within_check_every_and_never_reaches_the_weights(tiny):
    # What is guaranteed without a host read per microbatch: the stage notes a non-finite loss on
    # the device and its fused optimizer skips every step from then on (so no step from the bad
    # microbatch on reaches the parameters or the optimizer's moments); the host reads the note
    # every --nan-check-every training microbatches (and at each snapshot and at the end), so the
    # run stops at most that many microbatches late, naming the stage and the first bad microbatch.
    # Normalisation statistics are not covered (batch norm moves its running statistics in the
    # forward pass), which is why the weights of a stopped stage are refused rather than written.
    run = tiny(execution=replace(small_config().execution, nan_check_every=4))
    runner = SequentialRunner(run.setups, run.dataset)
    stream = [mb for mb in run.schedule if mb.phase == TRAIN]
    runner.submit(stream[0])
    before = parameters(runner.stages[0])
    bad = stream[1]
    run.dataset.train_x[bad.rows[0], 0, 0, 0] = float("nan")  # one sample of that microbatch
    submitted = 1
    with pytest.raises(NonFiniteLossError) as caught:
        for mb in stream[1:]:
            submitted += 1
            runner.submit(mb)
    assert submitted == 5, "a read after the first step, then every 4: the 5th step reads the flag"
    assert caught.value.stage == 0 and caught.value.microbatch == bad.index
    assert "stage 0" in str(caught.value) and f"microbatch {bad.index}" in str(caught.value)
    after = parameters(runner.stages[0])
    assert all(torch.equal(old, new) for old, new in zip(before, after)), "a NaN loss must not reach the weights"
    for read in (runner.stages[0].snapshot, runner.stages[0].state_dict):
        with pytest.raises(NonFiniteLossError):
            read()


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "__bool__")


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_a_stage_reads_nothing_from_its_device_per_microbatch(monkeypatch, rule):
    config = config_for(rule)
    config = replace(config, execution=replace(config.execution, nan_check_every=8))
    run = build_run(config)
    runner = SequentialRunner(run.setups, run.dataset)
    stream = [mb for mb in run.schedule if mb.epoch == 0]  # 16 training, 2 evaluation microbatches
    runner.submit(stream[0])  # the optimizers' state is made on the first step
    reads: Counter[str] = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for mb in stream[1:]:
        runner.submit(mb)
    monkeypatch.undo()
    # Only the periodic read of the losses: after the first step (before the count), then one
    # tolist per stage after the 9th (8 more training steps); none for steps 10 to 16.
    assert dict(reads) == {"tolist": len(runner.stages)}, dict(reads)


def test_a_stage_refuses_microbatches_out_of_stream_order(tiny):
    run = tiny()
    schedule, setups = run.schedule, run.setups
    stream = iter(schedule)
    first, second = schedule.read(next(stream)), schedule.read(next(stream))
    stage = Stage(setups[0])
    stage.step(second)
    with pytest.raises(RuntimeError, match="arrived after"):
        stage.step(first)


def test_a_stage_resumed_with_a_shorter_check_every_reads_within_its_own_buffers(tiny):
    # --nan-check-every may change on --resume: the steps until the next read come from the
    # checkpoint, and must not run past the resumed stage's (smaller) buffers of losses.
    run = tiny(execution=replace(small_config().execution, nan_check_every=32))
    train = [run.schedule.read(plan) for plan in run.schedule if plan.phase == TRAIN][:14]
    uninterrupted, stopped = Stage(run.setups[0]), Stage(run.setups[0])
    for mb in train[:5]:
        uninterrupted.step(mb)
        stopped.step(mb)
    resumed = Stage(replace(run.setups[0], check_every=4))
    resumed.restore(stopped.checkpoint_state())
    for mb in train[5:]:
        uninterrupted.step(mb)
        resumed.step(mb)
    assert all(torch.equal(a, b) for a, b in zip(weights(uninterrupted).values(), weights(resumed).values()))
