"""Forward-Forward's pieces against hand computations: the label input (values or conv channels),
the checks, random and hard negatives, the first stage's rows and loss, where the goodness is read,
and label scanning in chunks. Fast: no executor."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import small_config
from test_rules import B, lone_stage, microbatch, set_linear, softplus

from forwardflow.pipeline import losses
from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.messages import EVAL
from forwardflow.pipeline.model import BLOCKS, BlockSpec, ModelConfig, StageSpec
from forwardflow.pipeline.presets import fc_model
from forwardflow.pipeline.rules import ff
from forwardflow.pipeline.rules.ff import ForwardForwardOptions, ForwardForwardRule, LabelInput
from forwardflow.pipeline.validation import ConfigError

X_FF = [[0.2, 0.1, 0.0, 0.3, 1.0], [0.0, 0.5, 1.0, -0.4, 0.6]]  # 5 input values: room for 3 or 4 labels
# ---------------------------------------------------------------- Forward-Forward pieces


def first_ff_stage(hard: bool = False, num_classes: int = 3, width: int = 3, input_size: int = 5):
    return lone_stage(
        RuleConfig("ff", ForwardForwardOptions(threshold=0.5, hard_negatives=hard)),
        (BlockSpec("linear", width), BlockSpec("relu")),
        (input_size,),
        (width,),
        index=0,
        num_classes=num_classes,
    )


def test_ff_goodness_is_read_before_trailing_normalisations():
    def position(*kinds):
        return ff.activity_position(
            tuple(BlockSpec(kind, 3) if kind == "linear" else BlockSpec(kind) for kind in kinds)
        )

    assert position("linear", "relu", "layernorm") == 1
    assert position("linear", "relu", "dropout", "layernorm", "batchnorm") == 2
    assert position("linear", "layernorm") == 0
    assert position("layernorm") == 0
    assert position("linear", "relu") == 1


def test_ff_label_is_written_into_the_first_input_values():
    rule, _ = first_ff_stage()
    x = torch.arange(10.0).view(2, 5)
    label_rows = torch.tensor([[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    written = rule.label_input.write(x, label_rows)
    expected = x.clone()
    expected[:, :3] = label_rows * ff.LABEL_VALUE
    assert torch.allclose(written, expected) and torch.equal(x, torch.arange(10.0).view(2, 5))


def test_ff_first_layer_is_the_first_linear_or_conv_block():
    blocks = (BlockSpec("flatten"), BlockSpec("dropout", p=0.1), BlockSpec("linear", 8), BlockSpec("conv", 2))
    assert ff.first_layer(blocks) == (2, blocks[2])
    with pytest.raises(ConfigError) as refused:
        ff.first_layer((BlockSpec("flatten"), BlockSpec("relu")))
    assert (refused.value.where, refused.value.message) == (BLOCKS, "needs at least one linear or conv block")


def test_ff_conv_label_part_has_no_bias_of_its_own():
    conv_net = ModelConfig("c", (BlockSpec("conv", 4, kernel_size=3, padding=1), BlockSpec("relu")))
    label_input = LabelInput(conv_net_stage(conv_net), 3)
    assert label_input.label_conv is not None and label_input.label_conv.bias is None
    assert label_input.label_conv.weight.shape == (4, 3, 3, 3)
    maps = label_input.conv_part((5, 5), torch.tensor([[0.0, 1.0, 0.0]]))
    expected = torch.nn.functional.conv2d(
        torch.zeros(1, 3, 5, 5).index_fill(1, torch.tensor([1]), ff.LABEL_VALUE),
        label_input.label_conv.weight,
        padding=1,
    )
    assert torch.allclose(maps, expected, atol=1e-5)


def test_ff_conv_label_channels_on_a_non_square_image():
    conv = (BlockSpec("conv", 4, kernel_size=3, padding=1), BlockSpec("relu"))
    rule, blocks = lone_stage(
        RuleConfig("ff", ForwardForwardOptions()), conv, (2, 5, 7), (4, 5, 7), index=0, num_classes=3
    )
    x = torch.randn(2, 2, 5, 7, generator=torch.Generator().manual_seed(3))
    label_rows = torch.tensor([[0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    _, output = rule._run(blocks[:1], x, label_rows)
    channels = label_rows[:, :, None, None].expand(-1, -1, 5, 7) * ff.LABEL_VALUE
    weight = torch.cat([blocks[0].weight, rule.label_input.label_conv.weight], dim=1)
    expected = torch.nn.functional.conv2d(torch.cat([x, channels], 1), weight, blocks[0].bias, padding=1)
    assert torch.allclose(output, expected, atol=1e-5)


def conv_net_stage(model: ModelConfig) -> StageSpec:
    return StageSpec(index=0, num_stages=1, blocks=model.blocks, input_shape=(1, 5, 5), output_shape=(4, 5, 5), cost=0)


def ff_config(model: ModelConfig):
    return replace(small_config(), model=model, rule=RuleConfig("ff", ForwardForwardOptions()))


def test_ff_check_needs_two_classes_and_an_input_with_room_for_the_label():
    fc = ff_config(fc_model((8,)))
    ForwardForwardRule.check(fc, 2, (1, 3, 1))  # 2 classes, 3 input values: room for the label
    with pytest.raises(ConfigError) as refused:
        ForwardForwardRule.check(fc, 1, (1, 3, 1))
    assert (refused.value.where, refused.value.message) == (
        "--dataset",
        "rule ff draws a wrong label for every negative: it needs 2 or more classes",
    )
    with pytest.raises(ConfigError) as refused:
        ForwardForwardRule.check(fc, 3, (1, 3, 1))  # as many values as classes: none left for the data
    assert refused.value.where == "--rule" and refused.value.message.startswith(
        "ff writes the label into the first 3 input values, but the input of model fc-8 has only 3 ((1, 3, 1))"
    )
    conv = ff_config(ModelConfig("c", (BlockSpec("conv", 4), BlockSpec("relu"), BlockSpec("flatten"))))
    ForwardForwardRule.check(conv, 10, (1, 3, 3))  # a conv first layer takes the label as channels


def test_ff_random_negatives_come_from_the_stage_generator_shifting_the_true_label():
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    torch.manual_seed(0)
    drawn = ff.wrong_labels(labels, 3, generator)
    torch.manual_seed(1)  # the global generator plays no part
    assert torch.equal(ff.wrong_labels(labels, 3, torch.Generator().manual_seed(7)), drawn)
    shift = torch.randint(1, 3, labels.shape, generator=torch.Generator().set_state(state))
    assert drawn.tolist() == [(y + s) % 3 for y, s in zip(labels.tolist(), shift.tolist())]


def test_ff_first_stage_rows_neutral_positive_negative_and_the_label_scan():
    rule, blocks = first_ff_stage(num_classes=4)
    mb = microbatch(X_FF, [0, 2])  # class 3 absent: the one-hots still have 4 slots
    state = rule.generator.get_state()
    rows, label_rows = rule._first_stage_rows(blocks, mb, training=True)
    negatives = ff.wrong_labels(mb.labels, 4, torch.Generator().set_state(state))
    assert torch.equal(rows, torch.tensor(X_FF * 3))
    assert torch.equal(label_rows[:2], torch.full((2, 4), 0.25))
    assert torch.equal(label_rows[2:4], torch.eye(4)[[0, 2]])
    assert torch.equal(label_rows[4:], torch.eye(4)[negatives])
    rows, label_rows = rule._first_stage_rows(blocks, replace(mb, phase=EVAL), training=False)
    assert torch.equal(rows, torch.tensor(X_FF + [X_FF[0]] * 4 + [X_FF[1]] * 4))
    assert torch.equal(label_rows, torch.cat([torch.full((2, 4), 0.25), torch.eye(4), torch.eye(4)]))


def test_ff_hard_negatives_are_the_wrong_label_this_stage_finds_best():
    rule, blocks = first_ff_stage(hard=True, num_classes=3)
    weight = [[0.5, -1.0, 0.25, 0.0, 0.1], [1.0, 0.5, -0.5, 0.25, 0.0], [-0.25, 0.75, 1.0, -1.0, 0.2]]
    set_linear(blocks[0], weight, B)
    mb = microbatch(X_FF, [0, 2])
    _, label_rows = rule._first_stage_rows(blocks, mb, training=True)
    goodness = np.zeros((2, 3))
    for sample, x in enumerate(X_FF):
        for label in range(3):
            written = np.array(x, dtype=np.float64)
            written[:3] = np.eye(3)[label] * ff.LABEL_VALUE
            goodness[sample, label] = (np.maximum(np.asarray(weight) @ written + np.asarray(B), 0) ** 2).sum()
    goodness[[0, 1], [0, 2]] = -np.inf
    assert label_rows[4:].argmax(1).tolist() == goodness.argmax(1).tolist()
    assert blocks.training  # the scan ran in eval mode and left the stage training
    assert torch.isfinite(rule(blocks, mb, training=True).loss)  # the whole first-stage step


def test_ff_first_stage_training_loss_by_hand():
    rule, blocks = first_ff_stage(num_classes=3)
    weight = [[0.5, -1.0, 0.25, 0.0, 0.1], [1.0, 0.5, -0.5, 0.25, 0.0], [-0.25, 0.75, 1.0, -1.0, 0.2]]
    set_linear(blocks[0], weight, B)
    mb = microbatch(X_FF, [0, 2])
    negatives = ff.wrong_labels(mb.labels, 3, torch.Generator().set_state(rule.generator.get_state())).tolist()

    def goodness(x, label):
        written = np.array(x, dtype=np.float64)
        written[:3] = np.eye(3)[label] * ff.LABEL_VALUE
        return (np.maximum(np.asarray(weight) @ written + np.asarray(B), 0) ** 2).sum()

    theta = 0.5 * 3
    expected = np.mean(
        [
            softplus(theta - goodness(x, y)) + softplus(goodness(x, n) - theta)
            for x, y, n in zip(X_FF, [0, 2], negatives)
        ]
    )
    step = rule(blocks, mb, training=True)
    assert step.loss.item() == pytest.approx(expected, rel=1e-5)
    assert step.handed_on.context.shape == (4, 3)  # positive and negative rows go on


def test_ff_label_scan_in_chunks_equals_one_pass(monkeypatch):
    rule, blocks = lone_stage(
        RuleConfig("ff", ForwardForwardOptions()),
        (BlockSpec("linear", 3), BlockSpec("relu"), BlockSpec("layernorm")),  # activity before the norm
        (5,),
        (3,),
        index=0,
        num_classes=3,
    )
    blocks.eval()
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    label_rows = ff.all_labels(7, 3, x.device)[:7]
    whole = rule._blocks(blocks, x, label_rows, training=False)
    assert not torch.allclose(whole[0], whole[1])  # activity and output differ
    monkeypatch.setattr(ff, "EVAL_CHUNK_ROWS", 3)  # 7 rows: chunks of 3, 3 and 1
    chunked = rule._blocks(blocks, x, label_rows, training=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked))
    calls = []

    def run(blocks, rows, labels):
        calls.append((rows.shape[0], None if labels is None else labels.shape[0]))
        return rows, rows

    monkeypatch.setattr(rule, "_run", run)
    narrow = torch.zeros(7, 2)  # fewer columns than a chunk has rows: chunks count rows
    rule._blocks(blocks, narrow, label_rows, training=False)
    assert calls == [(3, 3), (3, 3), (1, 1)]
    calls.clear()
    rule._blocks(blocks, narrow, None, training=False)  # later stages: no label rows
    assert calls == [(3, None), (3, None), (1, None)]
    calls.clear()
    rule._blocks(blocks, narrow, label_rows, training=True)  # training rows are never chunked
    assert calls == [(7, 7)]


def test_ff_evaluation_starts_the_goodness_sum_in_the_only_stage_of_a_one_stage_model():
    rule, blocks = lone_stage(
        RuleConfig("ff", ForwardForwardOptions()),
        (BlockSpec("linear", 3), BlockSpec("relu")),
        (5,),
        (3,),
        index=0,
        num_stages=1,
        num_classes=3,
    )
    mb = microbatch(X_FF, [0, 2], phase=EVAL)
    step = rule(blocks, mb, training=False)
    _, label_rows = rule._first_stage_rows(blocks, mb, training=False)
    scan_rows = torch.tensor([X_FF[0]] * 3 + [X_FF[1]] * 3)
    activity, _ = rule._run(blocks, scan_rows, label_rows[2:])
    assert torch.allclose(step.handed_on.extra["goodness"], losses.goodness(activity).view(2, 3))


def test_ff_first_stage_of_several_leaves_the_goodness_sum_at_zero():
    rule, blocks = first_ff_stage(num_classes=3)
    step = rule(blocks, microbatch(X_FF, [0, 2], phase=EVAL), training=False)
    assert torch.equal(step.handed_on.extra["goodness"], torch.zeros(2, 3))
    assert step.loss is None and math.isclose(float(step.handed_on.inputs.pow(2).mean(1)[0]), 1.0, rel_tol=1e-4)
