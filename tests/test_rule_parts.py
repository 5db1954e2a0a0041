"""Each rule's parts against hand computations: the predictions every rule makes, the error fed
back by error forward-propagation and its loop, the Signal Propagation scores and losses, and what
every rule declares (predictions, stages, checks). Forward-Forward's pieces:
tests/test_ff_parts.py. Fast: no executor."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import small_config, tweak
from test_rules import B, W, lone_stage, microbatch, np_relu_layer, set_linear
from torch.utils._python_dispatch import TorchDispatchMode

from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, Prediction
from forwardflow.pipeline.model import BlockSpec, recomputable_tail, run_blocks
from forwardflow.pipeline.profiling import SavedActivations
from forwardflow.pipeline.rules.backprop import BackpropRule
from forwardflow.pipeline.rules.base import HEAD, Feedback, Predictor
from forwardflow.pipeline.rules.efp import ErrorFeedback, ErrorForwardOptions, ErrorForwardRule
from forwardflow.pipeline.rules.ff import ForwardForwardRule
from forwardflow.pipeline.rules.local import LocalOptions
from forwardflow.pipeline.rules.sigprop import SigPropOptions, SigPropRule, TargetProjection
from forwardflow.pipeline.validation import ConfigError

HEAD_W, HEAD_B = [[1.0, -0.5, 0.25], [-1.0, 0.5, 0.75]], [0.0, 0.1]
X = [[1.0, 0.5, 0.0, -0.5], [0.0, 2.0, 1.0, 0.0], [0.3, -0.3, 0.9, 0.3]]


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
    assert feedback.ready(mb) and feedback.attach(mb, inputs_of) is mb


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


def middle_stage_of_two_layers(loss_at: str):
    """A middle stage of two layers, 4 -> 3 (W, B) + ReLU and 3 -> 3 + ReLU, scored per class."""
    options = SigPropOptions(temperature=1.0, loss="per-class", loss_at=loss_at)
    blocks = (BlockSpec("linear", 3), BlockSpec("relu"), BlockSpec("linear", 3), BlockSpec("relu"))
    rule, modules = lone_stage(RuleConfig("sigprop", options), blocks, (4,), (3,), index=1, num_stages=3)
    set_linear(modules[0], W, B)
    return rule, modules


T_IN = [[0.5, 0.0, 1.0, -0.5], [-1.0, 0.5, 0.0, 1.0]]  # t_{l-1}, one row per class


@pytest.mark.parametrize("loss_at", ["stage", "layer"])
def test_sigprop_loss_at_layer_adds_each_layers_own_loss_and_keeps_the_gradients_apart(loss_at):
    rule, modules = middle_stage_of_two_layers(loss_at)
    second = modules[2]
    w2, b2 = second.weight.detach().double().numpy(), second.bias.detach().double().numpy()
    labels = [0, 1, 1]
    mb = microbatch(X, labels, targets=torch.tensor(T_IN))
    step = rule(modules, mb, training=True)
    h1, t1 = np_relu_layer(X), np_relu_layer(T_IN)
    h2, t2 = np.maximum(h1 @ w2.T + b2, 0.0), np.maximum(t1 @ w2.T + b2, 0.0)
    expected = np_cross_entropy(h2 @ t2.T, labels)
    if loss_at == "layer":
        expected += np_cross_entropy(h1 @ t1.T, labels)
    assert step.whole_loss().item() == pytest.approx(expected, rel=1e-5)
    # With a loss per layer the first layer's gradient is that of its own loss: the second
    # layer's weights do not reach it. With one loss per stage, they do. (With a loss per layer
    # the rule has already run the first layer's backward pass; the step's loss is the rest.)
    step.loss.backward()
    before = modules[0].weight.grad.clone()
    modules[0].weight.grad = None
    with torch.no_grad():
        second.weight.mul_(-2.0)
    rule(modules, mb, training=True).loss.backward()
    assert torch.allclose(before, modules[0].weight.grad) == (loss_at == "layer")


def test_sigprop_loss_at_layer_keeps_one_layers_activations_alive_at_a_time():
    blocks = tuple(spec for _ in range(5) for spec in (BlockSpec("linear", 64), BlockSpec("relu")))
    x = torch.randn(32, 64)
    peaks = {}
    for loss_at in ("stage", "layer"):
        options = SigPropOptions(temperature=1.0, loss="per-class", loss_at=loss_at)
        rule, modules = lone_stage(RuleConfig("sigprop", options), blocks, (64,), (64,), index=1, num_stages=3)
        saved = SavedActivations([*modules.parameters(), *rule.parameters()])
        with saved.hooks():
            step = rule(modules, microbatch(x.tolist(), [0, 1] * 16, targets=torch.randn(2, 64)), training=True)
            step.loss.backward()
        assert saved.bytes == 0  # every saved tensor was released by its backward pass
        peaks[loss_at] = saved.peak
    # Five equal layers, each saving its input and its output (the next one's input). With a loss
    # per layer each layer's backward pass runs before the next layer's forward: the peak is one
    # layer's two maps. With one loss per stage it is all six.
    assert peaks["layer"] * 2.5 < peaks["stage"]


LAYER_NORMED = (BlockSpec("linear", 64), BlockSpec("relu"), BlockSpec("layernorm")) * 3


@pytest.mark.parametrize("loss_at", ["stage", "layer"])
def test_sigprop_recompute_keeps_less_for_the_backward_pass_and_changes_no_number(loss_at):
    # The first and only stage (target layer, output head): every loss group's tail (the
    # LayerNorm after the ReLU), its scores and the head run again in the backward pass instead of keeping their
    # activations. Same loss, same gradients, bit for bit; a lower peak of saved activations.
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    results = {}
    for recompute in (False, True):
        options = SigPropOptions(loss_at=loss_at, recompute=recompute)
        rule, modules = lone_stage(
            RuleConfig("sigprop", options), LAYER_NORMED, (64,), (64,), index=0, num_stages=1, num_classes=4, head=True
        )
        saved = SavedActivations([*modules.parameters(), *rule.parameters()])
        with saved.hooks():
            step = rule(modules, microbatch(x.tolist(), [0, 1, 2, 3] * 8), training=True)
            step.loss.backward()
        assert saved.bytes == 0
        gradients = [p.grad.clone() for p in (*modules.parameters(), *rule.parameters())]
        results[recompute] = (step.whole_loss(), gradients, step.handed_on.inputs, saved.peak)
    (loss, gradients, handed, peak), (loss_r, gradients_r, handed_r, peak_r) = results[False], results[True]
    assert torch.equal(loss, loss_r) and torch.equal(handed, handed_r)
    assert len(gradients) == len(gradients_r) and all(torch.equal(a, b) for a, b in zip(gradients, gradients_r))
    # A group keeps its input and its ReLU's output, not the LayerNorm's output too (the scores'
    # and the head's input): one map fewer per group at least.
    map_bytes = (32 + 4) * 64 * 4
    assert peak_r <= peak - map_bytes


def test_only_deterministic_blocks_without_running_statistics_are_recomputed():
    def tail(*kinds):
        return recomputable_tail([BlockSpec(kind, 8) if kind == "linear" else BlockSpec(kind) for kind in kinds])

    # A ReLU keeps its output for its own backward pass, which is what the tail would keep: it
    # runs once, and the tail starts after it.
    assert tail("linear", "relu", "layernorm") == 2
    assert tail("linear", "gelu", "layernorm") == 1
    assert tail("linear", "relu") == 2  # nothing worth recomputing
    assert tail("linear", "gelu", "layernorm", "linear") == 4  # ends in a weight block: nothing
    assert tail("linear", "dropout", "gelu") == 2  # dropout draws its mask: recomputed after it only
    assert tail("gelu", "tanh") == 0


def test_under_bfloat16_autocast_the_nearest_target_is_scored_in_float32():
    # Two class targets that bfloat16 cannot tell apart (1 + 2^-9 rounds to 1): scored in
    # bfloat16 every sample's two scores would tie, and argmax would pick class 0 for all of them.
    options = SigPropOptions(temperature=1.0, loss="per-class")
    rule, modules = lone_stage(RuleConfig("sigprop", options), (BlockSpec("relu"),), (2,), (2,))
    targets = torch.tensor([[1.0, 0.0], [1.0 + 2**-9, 0.0]])
    mb = microbatch([[4.0, 0.0], [3.0, 1.0]], [1, 1], phase=EVAL, targets=targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = rule(modules, mb, training=False)
        assert rule.scores(*run_blocks(modules, mb.inputs, targets)).argmax(1).tolist() == [0, 0]  # the tie
    assert step.scores is not None and step.scores.dtype == torch.float32
    assert rule.own_outputs(mb, step)["nearest_target"].tolist() == [1, 1]


def test_under_bfloat16_autocast_the_output_head_predicts_from_float32_logits():
    options = SigPropOptions(temperature=1.0, loss="per-class")
    rule, modules = lone_stage(RuleConfig("sigprop", options), (BlockSpec("relu"),), (2,), (2,), index=2, head=True)
    assert rule.output_head is not None
    set_linear(rule.output_head, [[1.0, 0.0], [1.0 + 2**-9, 0.0]], [0.0, 0.0])  # rows bfloat16 can't tell apart
    mb = microbatch([[4.0, 0.0], [3.0, 1.0]], [1, 1], phase=EVAL, targets=torch.eye(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = rule(modules, mb, training=False)
        prediction = rule.predict(mb, step)
        assert rule.output_head(step.features).argmax(1).tolist() == [0, 0]  # the tie
    assert prediction.outputs[HEAD].tolist() == [1, 1]


class MatmulShapes(TorchDispatchMode):
    """The output shapes of every matrix product run inside it."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(out.shape))
        return out


def test_the_first_layer_computes_the_input_gradient_for_the_target_rows_only():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.LayerNorm(5)])
    x = torch.randn(7, 3, 2, 2)  # data: no gradient
    targets = torch.randn(2, 3, 2, 2, requires_grad=True)  # a learned target layer's output
    h, t = run_blocks(blocks, x, targets)
    with MatmulShapes() as products:
        (h.pow(2).sum() + t.sum()).backward()
    assert (2, 12) in products.shapes and (7 + 2, 12) not in products.shapes, products.shapes
    apart_gradient = targets.grad.clone()
    # The same values and gradient as the blocks on the concatenated batch.
    targets.grad = None
    joint = torch.cat([x, targets])
    for block in blocks:
        joint = block(joint)
    assert torch.allclose(joint[:7], h) and torch.allclose(joint[7:], t)
    (joint[:7].pow(2).sum() + joint[7:].sum()).backward()
    assert torch.allclose(targets.grad, apart_gradient, atol=1e-6)


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
    report = rule.training_report(train_mb, rule(blocks, train_mb, training=True))
    error = np_softmax(head_logits(X)) - np.eye(2)[labels]
    assert np.allclose(report.feedback.numpy(), error, atol=1e-6)
    assert report.outputs == {} and torch.equal(report.labels, train_mb.labels)  # training is not scored
    only_first = microbatch(X, [0, 0, 0])  # no sample of the last class: the error still has K columns
    fed_back = rule.training_report(only_first, rule(blocks, only_first, training=True)).feedback
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


def inputs_of(mb: Microbatch) -> torch.Tensor:
    return mb.inputs


def attach_train(feedback: ErrorFeedback, index: int, value: float) -> Microbatch:
    return feedback.attach(Microbatch(index, TRAIN, 0, torch.full((2, 3), value), torch.tensor([0, 1])), inputs_of)


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
