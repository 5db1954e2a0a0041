"""Each rule's parts against hand computations: the predictions every rule makes, the error fed
back by error forward-propagation and its loop, the Signal Propagation scores, and the pieces of
Forward-Forward (label input, negatives, chunked label scanning, checks). Fast: no executor."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import small_config, tweak
from test_rules import B, W, lone_stage, microbatch, np_relu_layer, set_linear, softplus

from forwardflow.pipeline import losses
from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, Prediction
from forwardflow.pipeline.model import BLOCKS, BlockSpec, ModelConfig, StageSpec
from forwardflow.pipeline.presets import fc_model
from forwardflow.pipeline.rules import ff
from forwardflow.pipeline.rules.backprop import BackpropRule
from forwardflow.pipeline.rules.base import HEAD, Feedback, Predictor
from forwardflow.pipeline.rules.efp import ErrorFeedback, ErrorForwardOptions, ErrorForwardRule
from forwardflow.pipeline.rules.ff import ForwardForwardOptions, ForwardForwardRule, LabelInput
from forwardflow.pipeline.rules.local import LocalOptions
from forwardflow.pipeline.rules.sigprop import SigPropOptions, SigPropRule, TargetProjection
from forwardflow.pipeline.validation import ConfigError

HEAD_W, HEAD_B = [[1.0, -0.5, 0.25], [-1.0, 0.5, 0.75]], [0.0, 0.1]
X = [[1.0, 0.5, 0.0, -0.5], [0.0, 2.0, 1.0, 0.0], [0.3, -0.3, 0.9, 0.3]]
X_FF = [[0.2, 0.1, 0.0, 0.3, 1.0], [0.0, 0.5, 1.0, -0.4, 0.6]]  # 5 input values: room for 3 or 4 labels


def np_softmax(logits):
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def np_cross_entropy(logits, labels):
    return float(np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels)]))


def head_logits(x):
    return np_relu_layer(x) @ np.asarray(HEAD_W).T + np.asarray(HEAD_B)


def last_stage(rule: RuleConfig, head: bool = True):
    """The last of three stages: one linear layer (W, B) + ReLU, 4 -> 3, and the output head."""
    built, blocks = lone_stage(
        rule, (BlockSpec("linear", 3), BlockSpec("relu")), (4,), (3,), index=2, num_stages=3, head=head
    )
    set_linear(blocks[0], W, B)
    if built.output_head is not None:
        set_linear(built.output_head, HEAD_W, HEAD_B)
    return built, blocks


# ---------------------------------------------------------------- every rule's predictions


def test_bp_predicts_with_its_output_layer_whatever_the_model_says():
    assert BackpropRule.predictors(head=False) == (Predictor(HEAD, "output head"),)
    rule, blocks = lone_stage(
        RuleConfig("bp"), (BlockSpec("linear", 3), BlockSpec("relu")), (4,), (3,), index=0, num_stages=1, head=False
    )
    set_linear(blocks[0], W, B)
    set_linear(rule.output_head, HEAD_W, HEAD_B)
    mb = microbatch(X, [1, 0, 1], phase=EVAL, index=7)
    step = rule(blocks, mb, training=False)
    prediction = rule.predict(mb, step)
    assert step.loss is None
    assert (prediction.index, prediction.phase, prediction.epoch) == (7, EVAL, mb.epoch)
    assert torch.equal(prediction.labels, mb.labels)
    assert prediction.outputs.keys() == {HEAD}
    assert prediction.outputs[HEAD].tolist() == head_logits(X).argmax(1).tolist()


def test_local_predicts_with_its_last_stage_classifier_and_the_output_head():
    rule, blocks = last_stage(RuleConfig("local", LocalOptions()))
    local_w, local_b = [[-0.5, 0.25, 1.0], [0.5, 1.0, -1.0]], [-0.1, 0.2]
    set_linear(rule.local_head.net[-1], local_w, local_b)
    mb = microbatch(X, [1, 0, 1], phase=EVAL)
    step = rule(blocks, mb, training=False)
    assert step.loss is None
    prediction = rule.predict(mb, step)
    local_logits = np_relu_layer(X) @ np.asarray(local_w).T + np.asarray(local_b)
    training = rule(blocks, microbatch(X, [1, 0, 1]), training=True)  # its own loss and the head's
    expected = np_cross_entropy(local_logits, [1, 0, 1]) + np_cross_entropy(head_logits(X), [1, 0, 1])
    assert training.loss.item() == pytest.approx(expected, rel=1e-6)
    assert prediction.outputs["local_head"].tolist() == local_logits.argmax(1).tolist()
    assert prediction.outputs[HEAD].tolist() == head_logits(X).argmax(1).tolist()
    assert local_logits.argmax(1).tolist() != head_logits(X).argmax(1).tolist()  # the two are told apart


def test_local_head_with_a_hidden_layer_on_a_small_conv_map():
    # A 1 x 3 map pools to 1 x 2 (never more than the map), then hidden ReLU layer of 5 units.
    rule, _ = lone_stage(RuleConfig("local", LocalOptions(head_width=5)), (BlockSpec("conv", 3),), (1, 1, 3), (3, 1, 3))
    first, second = [m for m in rule.local_head.net if isinstance(m, torch.nn.Linear)]
    assert (first.in_features, first.out_features, second.out_features) == (3 * 1 * 2, 5, 2)
    features = torch.randn(4, 3, 1, 3, generator=torch.Generator().manual_seed(2))
    pooled = torch.nn.functional.adaptive_avg_pool2d(features, (1, 2)).flatten(1)
    expected = torch.relu(pooled @ first.weight.T + first.bias) @ second.weight.T + second.bias
    assert torch.allclose(rule.local_head(features), expected, atol=1e-6)


def test_the_default_feedback_holds_nothing_back():
    feedback, mb = Feedback(), microbatch(X, [0, 1, 1])
    feedback.on_prediction(Prediction(0, TRAIN, 0, mb.labels))
    assert feedback.ready(mb) and feedback.attach(mb) is mb


def test_local_head_of_a_conv_stage_pools_the_map_to_two_by_two():
    rule, _ = lone_stage(RuleConfig("local", LocalOptions()), (BlockSpec("conv", 3),), (1, 6, 6), (3, 6, 6))
    features = torch.randn(2, 3, 6, 6)
    pooled = torch.nn.functional.adaptive_avg_pool2d(features, 2).flatten(1)
    linear = rule.local_head.net[-1]
    assert linear.in_features == 3 * 2 * 2
    assert torch.allclose(rule.local_head(features), pooled @ linear.weight.T + linear.bias, atol=1e-6)


@pytest.mark.parametrize("phase", [TRAIN, EVAL])
def test_sigprop_predicts_the_nearest_class_target_and_with_the_output_head(phase):
    rule, blocks = last_stage(RuleConfig("sigprop", SigPropOptions(temperature=1.0)))
    targets = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.5]]  # t of the two classes, before this stage
    mb = microbatch(X, [0, 1, 1], phase=phase, targets=torch.tensor(targets))
    step = rule(blocks, mb, training=phase == TRAIN)
    prediction = rule.predict(mb, step)
    scores = np_relu_layer(X) @ np_relu_layer(targets).T
    assert np.allclose(step.scores.numpy(), scores, rtol=1e-6)
    assert prediction.outputs["nearest_target"].tolist() == scores.argmax(1).tolist()
    assert prediction.outputs[HEAD].tolist() == head_logits(X).argmax(1).tolist()
    assert torch.equal(prediction.labels, mb.labels) and prediction.phase == phase


# ---------------------------------------------------------------- Signal Propagation


@pytest.mark.parametrize("conv", [False, True], ids=["fc", "conv"])
def test_sigprop_scores_default_to_the_square_root_of_the_features_per_position(conv):
    rule, _ = lone_stage(RuleConfig("sigprop", SigPropOptions()), (BlockSpec("linear", 4),), (4,), (4,))
    generator = torch.Generator().manual_seed(1)
    shape = (3, 4, 2, 3) if conv else (3, 4)  # 4 features per position: temperature sqrt(4) = 2
    h = torch.randn(*shape, generator=generator, dtype=torch.float64)
    t = torch.randn(2, *shape[1:], generator=generator, dtype=torch.float64)
    positions = 6 if conv else 1
    expected = [[float((h[i] * t[k]).sum()) / positions / 2.0 for k in range(2)] for i in range(3)]
    assert np.allclose(rule.scores(h, t).numpy(), expected)


@pytest.mark.parametrize("target_loss", [True, False])
def test_sigprop_first_stage_loss_adds_the_target_layer_loss_at_the_input_and_the_head_loss(target_loss):
    options = SigPropOptions(temperature=1.0, loss="per-class", target_loss=target_loss)
    rule, blocks = lone_stage(
        RuleConfig("sigprop", options),
        (BlockSpec("linear", 3), BlockSpec("relu")),
        (4,),
        (3,),
        index=0,
        num_stages=1,
        head=True,
    )
    set_linear(blocks[0], W, B)
    set_linear(rule.output_head, HEAD_W, HEAD_B)
    targets = rule.target_layer.weight.detach().double().numpy()  # t_0: one input-shaped row per class
    labels = [0, 1, 1]
    step = rule(blocks, microbatch(X, labels), training=True)
    at_input = np_cross_entropy(np.asarray(X) @ targets.T, labels) if target_loss else 0.0
    at_layer = np_cross_entropy(np_relu_layer(X) @ np_relu_layer(targets).T, labels)
    assert step.loss.item() == pytest.approx(at_input + at_layer + np_cross_entropy(head_logits(X), labels), rel=1e-5)
    assert np.allclose(step.handed_on.targets.numpy(), np_relu_layer(targets), atol=1e-6)
    assert rule(blocks, microbatch(X, labels, phase=EVAL), training=False).loss is None


def test_sigprop_target_projection_starts_at_scale_one_over_root_k_and_is_fixed_or_learned():
    torch.manual_seed(0)
    learned = TargetProjection(10, (1, 28, 28), learned=True)
    assert learned.forward().shape == (10, 1, 28, 28) and isinstance(learned.weight, torch.nn.Parameter)
    assert learned.weight.std().item() == pytest.approx(1 / math.sqrt(10), rel=0.03)
    fixed = TargetProjection(10, (1, 28, 28), learned=False)
    assert not fixed.learned and not any(True for _ in fixed.parameters()) and "weight" in dict(fixed.named_buffers())


# ---------------------------------------------------------------- error forward-propagation


def test_efp_feeds_back_the_output_error_of_training_microbatches_only():
    rule, blocks = last_stage(RuleConfig("efp"))
    labels = [1, 0, 1]
    train_mb = microbatch(X, labels)
    prediction = rule.predict(train_mb, rule(blocks, train_mb, training=True))
    error = np_softmax(head_logits(X)) - np.eye(2)[labels]
    assert np.allclose(prediction.feedback.numpy(), error, atol=1e-6)
    assert prediction.outputs[HEAD].tolist() == head_logits(X).argmax(1).tolist()
    only_first = microbatch(X, [0, 0, 0])  # no sample of the last class: the error still has K columns
    fed_back = rule.predict(only_first, rule(blocks, only_first, training=True)).feedback
    assert np.allclose(fed_back.numpy(), np_softmax(head_logits(X)) - np.eye(2)[[0, 0, 0]], atol=1e-6)
    eval_mb = microbatch(X, labels, phase=EVAL)
    eval_step = rule(blocks, eval_mb, training=False)
    assert eval_step.loss is None
    evaluation = rule.predict(eval_mb, eval_step)
    assert evaluation.feedback is None and evaluation.outputs[HEAD].tolist() == head_logits(X).argmax(1).tolist()


def test_efp_loss_is_the_head_loss_until_a_replay_arrives_then_the_contrast_is_added():
    rule, blocks = last_stage(RuleConfig("efp"))
    labels = [1, 0, 1]
    step = rule(blocks, microbatch(X, labels), training=True)
    head_loss = np_cross_entropy(head_logits(X), labels)
    assert step.loss.item() == pytest.approx(head_loss, rel=1e-6)
    assert np.allclose(step.scores.numpy(), head_logits(X), atol=1e-6)  # the stage's training accuracy
    step.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in blocks.parameters())  # no update signal yet
    clean, modulated = X[:2], [[0.8, 0.7, 0.1, -0.5], [0.2, 1.5, 1.0, 0.4]]
    with_replay = rule(blocks, microbatch(X, labels, context=torch.tensor(clean + modulated)), training=True)
    contrast = 0.5 * ((np_relu_layer(clean) - np_relu_layer(modulated)) ** 2).sum(1).mean()
    assert with_replay.loss.item() == pytest.approx(contrast + head_loss, rel=1e-6)
    assert torch.equal(with_replay.features, with_replay.handed_on.inputs)


def attach_train(feedback: ErrorFeedback, index: int, value: float) -> Microbatch:
    return feedback.attach(Microbatch(index, TRAIN, 0, torch.full((2, 3), value), torch.tensor([0, 1])))


def test_efp_loop_is_ready_only_when_the_error_to_replay_is_back():
    feedback = ErrorFeedback(delay=2, num_classes=2, input_shape=(3,), seed=0, scale=1.0)
    error = torch.tensor([[0.5, -0.5], [-0.25, 0.25]])
    probe = Microbatch(99, TRAIN, 0, torch.zeros(2, 3), torch.tensor([0, 1]))
    assert feedback.ready(probe)  # positions 0 and 1 carry no replay
    attach_train(feedback, 0, 0.0)
    assert feedback.ready(probe)
    attach_train(feedback, 1, 1.0)
    assert not feedback.ready(probe)  # position 2 replays position 0, whose error is not back
    assert feedback.ready(replace(probe, phase=EVAL))  # evaluation microbatches never wait
    feedback.on_prediction(Prediction(1, TRAIN, 0, torch.tensor([0, 1]), feedback=error))  # position 1's
    assert not feedback.ready(probe)
    feedback.on_prediction(Prediction(5, EVAL, 0, torch.tensor([0, 1])))  # not in flight: ignored
    feedback.on_prediction(Prediction(0, TRAIN, 0, torch.tensor([0, 1]), feedback=error))
    assert feedback.ready(probe)
    third = attach_train(feedback, 2, 2.0)
    assert torch.equal(third.context[:2], torch.zeros(2, 3))  # the replay of position 0
    assert feedback.ready(probe)  # position 3 replays position 1, whose error came back first
    fourth = attach_train(feedback, 3, 3.0)
    assert torch.equal(fourth.context[:2], torch.ones(2, 3))


def test_efp_loop_keeps_no_error_from_a_prediction_without_one():
    feedback = ErrorFeedback(delay=1, num_classes=2, input_shape=(3,), seed=0, scale=1.0)
    attach_train(feedback, 0, 0.0)
    feedback.on_prediction(Prediction(0, TRAIN, 0, torch.tensor([0, 1])))  # no feedback
    probe = Microbatch(1, TRAIN, 0, torch.zeros(2, 3), torch.tensor([0, 1]))
    assert not feedback.ready(probe)
    assert attach_train(feedback, 1, 1.0).context is None


def test_efp_loop_connection_is_fixed_by_the_seed_with_the_given_scale():
    def projection(seed, scale):
        return ErrorFeedback(delay=1, num_classes=10, input_shape=(50, 40), seed=seed, scale=scale).projection

    torch.manual_seed(123)  # the global generator plays no part
    first = projection(3, 0.5)
    torch.manual_seed(456)
    assert torch.equal(first, projection(3, 0.5)) and not torch.equal(first, projection(4, 0.5))
    assert first.shape == (10, 2000)
    assert first.std().item() == pytest.approx(0.5, rel=0.03) and first.mean().abs().item() < 0.02
    assert torch.allclose(projection(3, 2.0), first * 4)


def test_efp_loop_from_the_config_delays_by_the_window():
    efp = RuleConfig("efp", ErrorForwardOptions(feedback_scale=2.0))
    config = tweak(replace(small_config(), rule=efp), execution={"window": 3})
    feedback = ErrorForwardRule.make_feedback(config, 5, (1, 4, 2))
    reference = ErrorFeedback(delay=3, num_classes=5, input_shape=(1, 4, 2), seed=config.seed, scale=2.0)
    assert isinstance(feedback, ErrorFeedback) and feedback.delay == 3
    assert torch.equal(feedback.projection, reference.projection)


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


# ---------------------------------------------------------------- what every rule declares


def test_a_rule_declares_its_predictions_own_first_then_the_output_head():
    assert SigPropRule.predictors(head=True) == (
        Predictor("nearest_target", "nearest target"),
        Predictor(HEAD, "output head"),
    )
    assert SigPropRule.predictors(head=False) == (Predictor("nearest_target", "nearest target"),)
    assert ForwardForwardRule.predictors(head=True)[1] == Predictor(HEAD, "one pass")


def test_only_the_last_stage_has_the_output_head():
    middle, _ = lone_stage(RuleConfig("sigprop"), (BlockSpec("linear", 3),), (4,), (3,), index=1, head=True)
    last, _ = lone_stage(RuleConfig("sigprop"), (BlockSpec("linear", 3),), (4,), (3,), index=2, head=True)
    assert middle.output_head is None and last.output_head is not None


def test_end_to_end_rules_take_one_stage_and_refuse_more():
    assert BackpropRule.default_stages(5) == 1 and SigPropRule.default_stages(5) == 5
    bp = replace(small_config(), rule=RuleConfig("bp"))
    BackpropRule.check(replace(bp, model=replace(bp.model, stages=1)), 10, (1, 4, 4))
    with pytest.raises(ConfigError) as refused:
        BackpropRule.check(replace(bp, model=replace(bp.model, stages=2)), 10, (1, 4, 4))
    assert (refused.value.where, refused.value.message) == (
        "--stages",
        "rule bp trains end to end through one stage; use --stages 1",
    )
    sigprop = small_config()
    SigPropRule.check(replace(sigprop, model=replace(sigprop.model, stages=2)), 10, (1, 4, 4))
    with pytest.raises(ConfigError) as refused:
        ErrorForwardRule.check(
            replace(sigprop, rule=RuleConfig("efp"), model=replace(sigprop.model, head=False)), 10, (1, 4, 4)
        )
    assert (refused.value.where, refused.value.message) == (
        "--head",
        "rule efp predicts with the output head; the model needs one",
    )


def test_sigprop_positives_belong_to_the_contrastive_loss():
    with pytest.raises(ConfigError) as refused:
        SigPropOptions(loss="per-class", positives="one")
    assert (refused.value.where, refused.value.message) == (
        "--positives",
        "chooses the positives of --loss contrastive; --loss per-class scores each sample against one target per class",
    )
