"""Every rule through the executors and the builder: learning through the Ray pipeline, the
executors' agreement under the rules with state (negatives, the feedback loop), locality of every
update, the conv forms, and refusal of rule/model/flag combinations that cannot work."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import assert_executors_agree, assert_same_weights, run_to_end, tweak
from test_rules import CONV, RULE_NAMES, config_for

from forwardflow.launch import build
from forwardflow.launch.build import Run, build_run
from forwardflow.launch.cli import build_parser, parse_config
from forwardflow.launch.report import table
from forwardflow.launch.train import main
from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.data import make_synthetic
from forwardflow.pipeline.messages import TRAIN
from forwardflow.pipeline.presets import fc_model
from forwardflow.pipeline.rules.ff import LABEL_VALUE
from forwardflow.pipeline.rules.registry import RULES
from forwardflow.pipeline.rules.sigprop import SigPropOptions
from forwardflow.pipeline.runner import SequentialRunner
from forwardflow.pipeline.training import train
from forwardflow.pipeline.validation import ConfigError


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_every_rule_learns_the_synthetic_set_through_the_ray_pipeline(ray_cluster, rule):
    config = config_for(rule)
    if rule in ("ff", "efp"):  # rules with state of their own: wrong labels drawn, errors fed back
        result = assert_executors_agree(config)
    else:
        result = run_to_end(tweak(config, execution={"executor": "ray"}))
    assert result.evaluations[-1].accuracy >= 0.9


def test_sigprop_with_a_loss_per_layer_agrees_across_executors(ray_cluster):
    # Two stages of two layers each, every layer learning from its own loss (and the first one
    # running inputs and targets apart, pipeline/model.py run_blocks): the Ray run is the sequential
    # run. With --recompute too, and recomputing changes no weight.
    config = config_for("sigprop", model=replace(fc_model((24, 24, 16, 16), name="fc-tiny4"), stages=2), epochs=1)
    weights = {}
    for recompute in (False, True):
        config = replace(config, rule=RuleConfig("sigprop", SigPropOptions(loss_at="layer", recompute=recompute)))
        weights[recompute] = assert_executors_agree(config).weights
    assert_same_weights(weights[False], weights[True])


def hidden_stage_moved(result, run: Run) -> bool:
    initial = SequentialRunner(run.setups, run.dataset).stages[0].state_dict()["blocks.1.weight"]
    return not torch.equal(result.weights[0]["blocks.1.weight"], initial)


def test_efp_learns_from_the_feedback_loop_not_only_from_its_head():
    # Without the loop the hidden stages never change; with it they do, and accuracy is higher.
    run = build_run(config_for("efp"))
    with run:
        with_loop = run.train()
    without = train(run.schedule, SequentialRunner(run.setups, run.dataset), "head")  # the loop left out on purpose
    assert hidden_stage_moved(with_loop, run) and not hidden_stage_moved(without, run)
    assert with_loop.evaluations[-1].accuracy > without.evaluations[-1].accuracy


def test_every_benchmark_path_wires_the_efp_feedback_loop():
    # Each way a benchmark trains goes through the builder, which attaches the rule's loop: with it,
    # efp's hidden stages learn (without it they never move, as the test above shows).
    from benchmarks.accuracy import run_one
    from benchmarks.common import run as benchmark_run

    argv = ["--preset", "synthetic", "--rule", "efp", "--executor", "sequential", "--device", "cpu", "--epochs", "2"]
    argv.append("--no-progress")
    assert hidden_stage_moved(benchmark_run(argv), build_run(parse_config(argv)))
    config = config_for("efp")
    run = build_run(config)
    without = train(run.schedule, SequentialRunner(run.setups, run.dataset), "head")  # the loop left out on purpose
    measured = run_one(config, "efp")["accuracy"]
    assert measured == {"output head": run_to_end(config).evaluations[-1].accuracy}
    assert measured["output head"] != without.evaluations[-1].accuracy


@pytest.mark.parametrize("rule", ["sigprop", "ff", "local", "efp"])
def test_each_rule_update_changes_only_its_own_stage(rule):
    config = config_for(rule)
    run = build_run(config)
    feedback = run.rule.make_feedback(config, run.dataset.num_classes, run.dataset.input_shape)
    runner = SequentialRunner(run.setups, run.dataset)
    stream = [mb for mb in run.schedule if mb.phase == TRAIN]
    window = config.execution.pipeline_window
    for plan in stream[:window]:  # fills the loop: the next one carries a replay
        runner.submit(feedback.attach(plan, run.schedule.inputs_of))
        for prediction in runner.completed():
            feedback.on_prediction(prediction)
    handed = runner.stages[0].step(runner.source.read(feedback.attach(stream[window], run.schedule.inputs_of)))
    for tensor in [handed.inputs, handed.context, *handed.extra.values()]:
        assert tensor is None or not tensor.requires_grad
    before = [stage.state_dict() for stage in runner.stages]
    runner.stages[1].step(handed)
    after = [stage.state_dict() for stage in runner.stages]
    for index, (old, new) in enumerate(zip(before, after)):
        changed = [name for name in old if not torch.equal(old[name], new[name])]
        assert bool(changed) == (index == 1), f"stage {index}: {changed}"


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_every_rule_trains_its_conv_form(rule):
    config = config_for(rule, model=CONV, epochs=1)
    config = tweak(config, data={"train_limit": 512, "test_limit": 128})  # efp: replays from the 5th microbatch
    run = build_run(config)
    untrained = SequentialRunner(run.setups, run.dataset)
    initial = untrained.state_dicts()
    # Parameters, not buffers: batch norm's running statistics move without any learning.
    learnable = [{"blocks." + name for name, _ in stage.blocks.named_parameters()} for stage in untrained.stages]
    with run:
        result = run.train()
    assert all(np.isfinite(stage.mean_loss) for stage in result.stages)
    for stage, (before, after, names) in enumerate(zip(initial, result.weights, learnable)):
        assert names and any(not torch.equal(before[k], after[k]) for k in names), stage
    final = result.evaluations[-1]
    assert set(final.accuracies) == {p.key for p in run.predictors}
    assert all(0.0 <= value <= 1.0 for value in final.accuracies.values())


def test_ff_conv_first_layer_adds_the_label_as_constant_input_channels():
    # conv(concat(image, label channels)) == conv(image) + the rule's label part, for any input size.
    config = config_for("ff", model=CONV)
    config.rule.rule_class.check(config, 10, (1, 3, 3))  # no error: the label needs no input values
    run = build_run(config)
    stage = SequentialRunner(run.setups, run.dataset).stages[0]
    rule, conv = stage.rule, stage.blocks[0]
    x = torch.randn(3, 1, 8, 8)
    label_rows = torch.nn.functional.one_hot(torch.tensor([0, 3, 1]), 4).float()
    _, output = rule._run(stage.blocks[:1], x, label_rows)  # the first block alone: the conv
    channels = label_rows[:, :, None, None].expand(-1, -1, 8, 8) * LABEL_VALUE
    weight = torch.cat([conv.weight, rule.label_input.label_conv.weight], dim=1)
    expected = torch.nn.functional.conv2d(torch.cat([x, channels], 1), weight, conv.bias, padding=conv.padding)
    assert torch.allclose(output, expected, atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_ff_on_a_model_whose_input_cannot_hold_the_label_is_refused_with_one_line(monkeypatch, capsys):
    def tiny_input(config, seed):  # a user's data set of 3x3 inputs and 10 classes
        return make_synthetic(seed, num_classes=10, shape=(1, 3, 3))

    monkeypatch.setattr(build, "load_data", tiny_input)
    monkeypatch.setattr(Run, "start", lambda self: pytest.fail("the run was started"))
    assert main(["--preset", "synthetic", "--rule", "ff", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--rule" in lines[0] and "first 10 input values" in lines[0]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--rule", "ff", "--loss", "per-class"], "--loss"),
        (["--rule", "sigprop", "--ff-threshold", "3"], "--ff-threshold"),
        (["--rule", "local", "--hard-negatives"], "--hard-negatives"),
        (["--rule", "bp", "--head-width", "8"], "--head-width"),
        (["--rule", "sigprop", "--feedback-scale", "1"], "--feedback-scale"),
        (["--rule", "sigprop", "--loss", "per-class", "--positives", "topk"], "--positives"),
    ],
)
def test_a_flag_the_chosen_rule_cannot_use_is_refused_with_one_line(capsys, argv, flag):
    assert main(["--preset", "synthetic", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"forwardflow: error: {flag}:"), lines


def test_rule_flags_reach_the_rule_options():
    options = parse_config(
        [
            "--preset",
            "synthetic",
            "--positives",
            "topk",
            "--topk",
            "3",
            "--target-layer",
            "fixed",
            "--temperature",
            "2.5",
            "--no-target-loss",
            "--loss-at",
            "layer",
            "--recompute",
        ]
    ).rule.options
    assert (
        options.positives,
        options.topk,
        options.target_layer,
        options.temperature,
        options.target_loss,
        options.loss_at,
        options.recompute,
    ) == ("topk", 3, "fixed", 2.5, False, "layer", True)
    options = parse_config(
        ["--preset", "synthetic", "--rule", "ff", "--ff-threshold", "1.5", "--hard-negatives"]
    ).rule.options
    assert (options.threshold, options.hard_negatives) == (1.5, True)
    assert (
        parse_config(["--preset", "synthetic", "--rule", "local", "--head-width", "32"]).rule.options.head_width == 32
    )
    assert (
        parse_config(["--preset", "synthetic", "--rule", "efp", "--feedback-scale", "2"]).rule.options.feedback_scale
        == 2.0
    )


def test_ff_preset_hard_negatives_can_be_turned_off_from_the_command_line():
    preset = parse_config(["--preset", "mnist-ff"])
    random_negatives = parse_config(["--preset", "mnist-ff", "--no-hard-negatives"])
    assert preset.rule.options.hard_negatives and not random_negatives.rule.options.hard_negatives
    assert random_negatives.optim == preset.optim and random_negatives.schedule == preset.schedule


def test_efp_without_an_output_head_is_refused():
    config = config_for("efp", model=replace(fc_model((8, 8)), head=False))
    with pytest.raises(ConfigError, match="--head"):
        build_run(config)


def test_bp_through_several_stages_is_refused():
    with pytest.raises(ConfigError, match="--stages"):
        build_run(config_for("bp", model=replace(fc_model((8, 8)), stages=2)))


def rule_option_flags() -> list[tuple[str, str, list[str]]]:
    """(flag, a rule that does not take it, a value for it) for every option flag of every rule."""
    _, flags = build_parser()
    return [
        (flag.flag, other, [] if isinstance(getattr(RULES[flag.rules[0]].Options(), flag.name), bool) else ["1"])
        for flag in flags.values()
        if flag.section == "rule.options"
        for other in RULES
        if other not in flag.rules
    ]


@pytest.mark.parametrize("flag, rule, value", rule_option_flags())
def test_every_rule_option_is_refused_with_any_other_rule(capsys, flag, rule, value):
    assert main(["--preset", "synthetic", "--rule", rule, flag, *value]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"forwardflow: error: {flag}: applies to --rule"), lines


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_the_primary_prediction_is_one_definition_for_training_summary_table_and_benchmarks(rule, capsys):
    from benchmarks.accuracy import run_one

    config = config_for(rule, epochs=1)
    run = build_run(config)
    primary = run.predictors[0]
    with run:
        result = run.train()
    assert result.evaluations[-1].primary == primary.key  # the training loop's test accuracy
    summary = run.finish(result)
    assert summary["prediction"] == primary.key and summary["test_accuracy"] == result.evaluations[-1].accuracy
    assert table(summary).splitlines()[2].split("  ")[1].strip() == primary.label  # the first column
    assert run_one(config, rule)["primary"] == primary.label  # the accuracy benchmark's table and plot
