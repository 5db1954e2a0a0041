"""The learning rules: each local loss against a hand computation, Forward-Forward's negatives and
its two kinds of prediction, and the error forward-propagation loop. Through the executors and the
command line: tests/test_rules_pipeline.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import small_config, tweak

from forwardflow.launch.build import build_run
from forwardflow.pipeline.config import RuleConfig, RunConfig
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, MicrobatchPlan, Prediction
from forwardflow.pipeline.model import BlockSpec, ModelConfig, StageSpec, build_stage_blocks
from forwardflow.pipeline.presets import fc_model
from forwardflow.pipeline.rules.base import RuleContext
from forwardflow.pipeline.rules.efp import ErrorFeedback
from forwardflow.pipeline.rules.ff import ForwardForwardOptions, hardest_wrong_labels, wrong_labels
from forwardflow.pipeline.rules.local import LocalOptions
from forwardflow.pipeline.rules.sigprop import SigPropOptions
from forwardflow.pipeline.runner import SequentialRunner
from forwardflow.pipeline.training import RunObserver

RULE_NAMES = ("sigprop", "ff", "local", "efp", "bp")
# Per-rule settings that learn the synthetic set in a few epochs.
RULE_SETTINGS = {
    "sigprop": (RuleConfig("sigprop"), 2e-3, 3),
    "ff": (RuleConfig("ff", ForwardForwardOptions(threshold=1.0)), 1e-2, 6),
    "local": (RuleConfig("local"), 2e-3, 3),
    "efp": (RuleConfig("efp"), 2e-3, 5),
    "bp": (RuleConfig("bp"), 2e-3, 3),
}
CONV = ModelConfig(
    "conv-tiny",
    (
        BlockSpec("conv", 4),
        BlockSpec("batchnorm"),
        BlockSpec("relu"),
        BlockSpec("maxpool", kernel_size=2),
        BlockSpec("conv", 8),
        BlockSpec("batchnorm"),
        BlockSpec("relu"),
        BlockSpec("maxpool", kernel_size=2),
        BlockSpec("flatten"),
        BlockSpec("linear", 16),
        BlockSpec("relu"),
        BlockSpec("layernorm"),
    ),
)


def config_for(rule: str, model: ModelConfig | None = None, epochs: int | None = None) -> RunConfig:
    """A small synthetic run of ``rule`` (sequential unless changed); efp's feedback loop is 4 long."""
    rule_config, lr, rule_epochs = RULE_SETTINGS[rule]
    config = replace(small_config(), model=model or fc_model((24, 24, 16), name="fc-tiny"), rule=rule_config)
    config = tweak(config, optim={"lr": lr}, schedule={"epochs": epochs or rule_epochs})
    return tweak(config, execution={"window": 4}) if rule_config.rule_class.uses_window else config


def lone_stage(
    rule: RuleConfig,
    blocks: tuple[BlockSpec, ...],
    input_shape,
    output_shape,
    index=1,
    num_stages=3,
    num_classes=2,
    head=False,
):
    """A rule and its blocks for one stage, built outside any executor for hand computation."""
    spec = StageSpec(
        index=index, num_stages=num_stages, blocks=blocks, input_shape=input_shape, output_shape=output_shape, cost=0
    )
    torch.manual_seed(0)
    modules = build_stage_blocks(spec)
    return rule.rule_class(RuleContext(rule.options, spec, num_classes, input_shape, head)), modules


def set_linear(module: torch.nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        module.bias.copy_(torch.tensor(bias, dtype=torch.float32))


W = [[0.5, -1.0, 0.25, 0.0], [1.0, 0.5, -0.5, 0.25], [-0.25, 0.75, 1.0, -1.0]]
B = [0.1, -0.2, 0.05]


def np_relu_layer(x):
    return np.maximum(np.asarray(x, dtype=np.float64) @ np.asarray(W).T + np.asarray(B), 0.0)


def softplus(v):
    return np.log1p(np.exp(v))


def microbatch(inputs, labels, phase=TRAIN, index=0, **fields):
    return Microbatch(index, phase, 0, torch.tensor(inputs, dtype=torch.float32), torch.tensor(labels), **fields)


# ---------------------------------------------------------------- each rule's loss by hand


def explicit_contrastive(h, t, labels, positives, k, temperature):
    """Signal Propagation's batch loss with the full B x B matrix S_ij = <h_i, t_{y_j}> / T."""
    scores = h @ t[labels].T / temperature
    log_p = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    total = 0.0
    for i in range(len(labels)):
        same = [j for j in range(len(labels)) if labels[j] == labels[i]]
        if positives == "one":
            same = [i]
        elif positives == "topk":
            same = sorted(same, key=lambda j: -scores[i, j])[:k]
        total -= sum(log_p[i, j] for j in same)
    return total / len(labels)


@pytest.mark.parametrize("positives", ["all", "one", "topk"])
def test_sigprop_contrastive_loss_matches_the_explicit_batch_matrix(positives):
    rule, _ = lone_stage(
        RuleConfig("sigprop", SigPropOptions(positives=positives, topk=2, temperature=2.0)),
        (BlockSpec("linear", 3),),
        (4,),
        (3,),
        num_classes=3,
    )
    h = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 1.0, 1.0], [2.0, 0.5, -0.5], [1.0, 1.0, 1.0]])
    t = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    labels = np.array([0, 1, 0, 0, 2])
    scores = rule.scores(torch.tensor(h), torch.tensor(t))
    loss = rule.local_loss(scores, torch.tensor(labels))
    assert loss.item() == pytest.approx(explicit_contrastive(h, t, labels, positives, 2, 2.0), rel=1e-6)


def test_sigprop_per_class_loss_is_cross_entropy_against_the_class_targets():
    rule, _ = lone_stage(
        RuleConfig("sigprop", SigPropOptions(loss="per-class", temperature=1.0)), (BlockSpec("linear", 2),), (4,), (2,)
    )
    h, t, labels = np.array([[1.0, 2.0], [0.0, -1.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 0])
    loss = rule.local_loss(rule.scores(torch.tensor(h), torch.tensor(t)), torch.tensor(labels))
    scores = h @ t.T
    expected = np.mean([np.log(np.exp(scores[i]).sum()) - scores[i, labels[i]] for i in range(2)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("target_layer", ["fixed", "learned"])
def test_sigprop_fixed_target_layer_never_moves_and_a_learned_one_does(target_layer):
    config = replace(config_for("sigprop"), rule=RuleConfig("sigprop", SigPropOptions(target_layer=target_layer)))
    run = build_run(config)
    runner = SequentialRunner(run.setups, run.dataset)
    target = runner.stages[0].rule.target_layer
    before = target.weight.detach().clone()
    runner.submit(next(iter(run.schedule)))
    assert isinstance(target.weight, torch.nn.Parameter) == (target_layer == "learned")
    assert torch.equal(before, target.weight.detach()) == (target_layer == "fixed")


def test_ff_loss_goodness_and_label_scan_sum_by_hand():
    rule, blocks = lone_stage(
        RuleConfig("ff", ForwardForwardOptions(threshold=0.5)), (BlockSpec("linear", 3), BlockSpec("relu")), (4,), (3,)
    )
    set_linear(blocks[0], W, B)
    neutral = [[0.2, 0.1, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0]]
    positive = [[1.0, 0.5, 0.0, -0.5], [0.0, 2.0, 1.0, 0.0]]
    negative = [[-1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]]
    mb = microbatch(neutral, [0, 1], context=torch.tensor(positive + negative))
    step = rule(blocks, mb, training=True)
    good_pos = (np_relu_layer(positive) ** 2).sum(1)
    good_neg = (np_relu_layer(negative) ** 2).sum(1)
    theta = 0.5 * 3  # per unit, times the 3 units of the layer
    expected = np.mean(softplus(theta - good_pos) + softplus(good_neg - theta))
    assert step.loss.item() == pytest.approx(expected, rel=1e-6)
    handed = step.handed_on.inputs
    assert torch.allclose(handed.pow(2).mean(1), torch.ones(2), atol=1e-4)  # length-normalised
    # Evaluation: each copy's goodness (one per label) is added to the running sum.
    scan = positive + negative  # 2 samples x 2 labels, sample-major
    so_far = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    eval_mb = microbatch(neutral, [0, 1], phase=EVAL, context=torch.tensor(scan), extra={"goodness": so_far})
    step = rule(blocks, eval_mb, training=False)
    expected_sum = so_far.numpy() + (np_relu_layer(scan) ** 2).sum(1).reshape(2, 2)
    assert np.allclose(step.handed_on.extra["goodness"].numpy(), expected_sum, rtol=1e-6)
    assert rule.predict(eval_mb, step).outputs["scan"].tolist() == expected_sum.argmax(1).tolist()


def test_local_head_loss_is_the_cross_entropy_of_the_stage_classifier():
    rule, blocks = lone_stage(
        RuleConfig("local", LocalOptions()), (BlockSpec("linear", 3), BlockSpec("relu")), (4,), (3,)
    )
    set_linear(blocks[0], W, B)
    head_w, head_b = [[1.0, -0.5, 0.25], [-1.0, 0.5, 0.75]], [0.0, 0.1]
    set_linear(rule.local_head.net[-1], head_w, head_b)
    x, labels = [[1.0, 0.5, 0.0, -0.5], [0.0, 2.0, 1.0, 0.0], [0.3, 0.3, 0.3, 0.3]], [0, 1, 1]
    step = rule(blocks, microbatch(x, labels), training=True)
    logits = np_relu_layer(x) @ np.asarray(head_w).T + np.asarray(head_b)
    expected = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels)])
    assert step.loss.item() == pytest.approx(expected, rel=1e-6)


def test_efp_loss_contrasts_clean_and_modulated_replays_by_hand():
    rule, blocks = lone_stage(RuleConfig("efp"), (BlockSpec("linear", 3), BlockSpec("relu")), (4,), (3,))
    set_linear(blocks[0], W, B)
    own = [[0.0, 0.0, 1.0, 0.0]]
    clean, modulated = [[1.0, 0.5, 0.0, -0.5], [0.0, 2.0, 1.0, 0.0]], [[0.8, 0.7, 0.1, -0.5], [0.2, 1.5, 1.0, 0.4]]
    step = rule(blocks, microbatch(own, [0], context=torch.tensor(clean + modulated)), training=True)
    expected = 0.5 * ((np_relu_layer(clean) - np_relu_layer(modulated)) ** 2).sum(1).mean()
    assert step.loss.item() == pytest.approx(expected, rel=1e-6)
    assert step.handed_on.context.shape == (4, 3)  # the replay goes on through the next stages


def test_efp_feedback_replays_the_error_a_fixed_number_of_training_microbatches_later():
    feedback = ErrorFeedback(delay=2, num_classes=2, input_shape=(3,), seed=0, scale=0.5)
    inputs = [torch.full((2, 3), float(i)) for i in range(4)]

    def inputs_of(plan: MicrobatchPlan) -> torch.Tensor:  # the host's copy of a plan's samples
        return inputs[plan.index]

    error = torch.tensor([[0.5, -0.5], [-0.25, 0.25]])
    plans = [MicrobatchPlan(i, EVAL if i == 2 else TRAIN, i // 3, torch.tensor([2 * i, 2 * i + 1])) for i in range(4)]
    first = feedback.attach(plans[0], inputs_of)
    feedback.on_prediction(Prediction(0, TRAIN, 0, torch.tensor([0, 1]), feedback=error))
    second = feedback.attach(plans[1], inputs_of)
    evaluation = feedback.attach(plans[2], inputs_of)
    third = feedback.attach(plans[3], inputs_of)
    assert first.context is None and second.context is None and evaluation.context is None
    projection = feedback.projection.numpy()
    expected = np.concatenate([inputs[0].numpy(), inputs[0].numpy() - error.numpy() @ projection])
    assert np.allclose(third.context.numpy(), expected)
    assert torch.equal(third.rows, plans[3].rows)


def test_bp_loss_is_the_cross_entropy_of_the_whole_net():
    rule, blocks = lone_stage(
        RuleConfig("bp"), (BlockSpec("linear", 3), BlockSpec("relu")), (4,), (3,), index=0, num_stages=1
    )
    set_linear(blocks[0], W, B)
    head_w, head_b = [[1.0, -0.5, 0.25], [-1.0, 0.5, 0.75]], [0.0, 0.1]
    set_linear(rule.output_head, head_w, head_b)
    x, labels = [[1.0, 0.5, 0.0, -0.5], [0.0, 2.0, 1.0, 0.0]], [1, 0]
    step = rule(blocks, microbatch(x, labels), training=True)
    logits = np_relu_layer(x) @ np.asarray(head_w).T + np.asarray(head_b)
    expected = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels)])
    assert step.loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- Forward-Forward specifics


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_ff_wrong_labels_never_carry_the_true_label_and_cover_all_others(num_classes):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat(500)
    wrong = wrong_labels(labels, num_classes, generator)
    assert not (wrong == labels).any()
    pairs = set(zip(labels.tolist(), wrong.tolist()))
    assert len(pairs) == num_classes * (num_classes - 1)  # every wrong label does occur


def test_ff_hard_negatives_pick_the_best_wrong_label_even_when_the_true_one_wins():
    goodness = torch.tensor([[9.0, 5.0, 7.0], [1.0, 2.0, 3.0], [4.0, 8.0, 0.0]])
    assert hardest_wrong_labels(goodness, torch.tensor([0, 2, 0])).tolist() == [2, 1, 1]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("model", [None, CONV], ids=["fc", "conv"])
def test_ff_first_stage_negative_rows_never_carry_the_true_label(hard, model):
    config = replace(config_for("ff", model=model), rule=RuleConfig("ff", ForwardForwardOptions(hard_negatives=hard)))
    run = build_run(config)
    stage = SequentialRunner(run.setups, run.dataset).stages[0]
    for plan in list(run.schedule)[:5]:
        if plan.phase != TRAIN:
            continue
        mb = run.schedule.read(plan)
        _, label_rows = stage.rule._first_stage_rows(stage.blocks, mb, training=True)
        size = mb.size
        assert torch.equal(label_rows[size : 2 * size].argmax(1), mb.labels)  # positives: the true label
        assert not (label_rows[2 * size :].argmax(1) == mb.labels).any()  # negatives: never


class LastEvaluation(RunObserver):
    """The evaluation predictions of the last epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.predictions: list[Prediction] = []

    def on_prediction(self, prediction, progress):
        if prediction.phase == EVAL and prediction.epoch == self.epoch:
            self.predictions.append(prediction)


def test_ff_label_scanning_and_one_pass_prediction_agree_on_an_easy_set():
    config = config_for("ff")
    observer = LastEvaluation(config.schedule.epochs - 1)
    with build_run(config, [observer]) as run:
        final = run.train().evaluations[-1]
    scan = torch.cat([p.outputs["scan"] for p in observer.predictions])
    one_pass = torch.cat([p.outputs["head"] for p in observer.predictions])
    assert len(scan) == 256
    assert final.accuracies["scan"] >= 0.9 and final.accuracies["head"] >= 0.9
    assert (scan == one_pass).float().mean().item() >= 0.9
    assert final.accuracy == final.accuracies["scan"]  # label scanning is ff's own prediction
