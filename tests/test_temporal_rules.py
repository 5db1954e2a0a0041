"""The rules that carry the gradient through time, against a hand-unrolled BPTT on a tiny net
(torch.nn.GRUCell, LayerNorm and Linear with the stage's weights): TBPTT(n, n) is BPTT, TBPTT(1, n)
backpropagates every step's loss through the whole prefix, TBPTT(k, k) stops at the window's
start, and RTRL's forward-mode gradient is BPTT's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import small_sequence_config, tweak

from forwardflow.launch.build import build_run
from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.presets import rnn_model
from forwardflow.pipeline.rules.tbptt import TruncatedBPTTOptions
from forwardflow.pipeline.stage import Stage

STEPS, FEATURES, HIDDEN, CLASSES = 8, 8, 6, 4  # the synthetic images by rows


def tbptt_stage(k1: int, k2: int, rule: str = "tbptt") -> tuple[Stage, list]:
    config = small_sequence_config(model=rnn_model((HIDDEN,), name="gru-6"))
    options = TruncatedBPTTOptions(k1=k1, k2=k2) if rule == "tbptt" else None
    config = replace(config, rule=RuleConfig(rule, options))
    run = build_run(config)
    stream = run.schedule.microbatches()
    return Stage(run.setups[0]), [next(stream) for _ in range(STEPS)]


def hand_net(weights: dict[str, torch.Tensor]):
    """The stage's net (GRU, LayerNorm, output layer) as torch's own modules, with its weights."""
    cell, norm, head = torch.nn.GRUCell(FEATURES, HIDDEN), torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, CLASSES)
    copies = (
        (cell.weight_ih, "blocks.0.input.weight"),
        (cell.bias_ih, "blocks.0.input.bias"),
        (cell.weight_hh, "blocks.0.recurrent.weight"),
        (cell.bias_hh, "blocks.0.recurrent.bias"),
        (norm.weight, "blocks.1.weight"),
        (norm.bias, "blocks.1.bias"),
        (head.weight, "rule.output_head.weight"),
        (head.bias, "rule.output_head.bias"),
    )
    with torch.no_grad():
        for parameter, name in copies:
            parameter.copy_(weights[name])
    return cell, norm, head


def hand_gradient(weights, steps, start_state, losses_from: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Unrolled by hand from ``start_state`` over ``steps``: the gradient of the summed losses of
    the steps from ``losses_from`` on (in the stage's parameter order), and the final state."""
    cell, norm, head = hand_net(weights)
    h, total = start_state, torch.zeros(())
    for position, mb in enumerate(steps):
        h = cell(mb.inputs, h)
        if position >= losses_from:
            total = total + F.cross_entropy(head(norm(h)), mb.labels)
    params = [cell.weight_ih, cell.bias_ih, cell.weight_hh, cell.bias_hh, norm.weight, norm.bias]
    grads = torch.autograd.grad(total, params + [head.weight, head.bias])
    return list(grads), h.detach()


def stage_gradient(stage: Stage) -> list[torch.Tensor]:
    params = list(stage.blocks.parameters()) + list(stage.rule.output_head.parameters())
    return [p.grad.clone() for p in params]


def assert_close(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    for a, b in zip(left, right):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("rule", ["tbptt", "bptt"])
def test_tbptt_n_n_is_bptt_over_the_whole_sequence(rule):
    stage, steps = tbptt_stage(STEPS, STEPS, rule)
    initial = stage.state_dict()
    for mb in steps:
        stage.step(mb)
    assert stage.stats.updates == 1 and stage.stats.first_update_step == STEPS
    expected, _ = hand_gradient(initial, steps, torch.zeros(len(steps[0].labels), HIDDEN), losses_from=0)
    assert_close(stage_gradient(stage), expected)


def test_tbptt_1_n_backpropagates_every_steps_loss_through_the_whole_prefix():
    stage, steps = tbptt_stage(1, STEPS)
    zero = torch.zeros(len(steps[0].labels), HIDDEN)
    for t, mb in enumerate(steps):
        weights = stage.state_dict()  # the weights this step's update starts from
        stage.step(mb)
        expected, _ = hand_gradient(weights, steps[: t + 1], zero, losses_from=t)
        assert_close(stage_gradient(stage), expected)
        if t >= 1:  # a gradient that stopped at the step before would differ
            cell, _, _ = hand_net(weights)
            with torch.no_grad():
                before = zero
                for earlier in steps[:t]:
                    before = cell(earlier.inputs, before)
            truncated, _ = hand_gradient(weights, steps[t : t + 1], before, losses_from=0)
            assert not torch.allclose(truncated[0], expected[0], rtol=1e-4, atol=1e-6)
    assert stage.stats.updates == STEPS


def test_tbptt_k_k_stops_at_the_start_of_each_window_of_k_steps():
    k = 3
    stage, steps = tbptt_stage(k, k)
    state = torch.zeros(len(steps[0].labels), HIDDEN)  # the online state, step by step
    window_start, window_state = 0, state
    for t, mb in enumerate(steps):
        weights = stage.state_dict()
        stage.step(mb)
        cell, _, _ = hand_net(weights)
        with torch.no_grad():
            state = cell(mb.inputs, state)
        if (t + 1) % k == 0 or t == STEPS - 1:  # an update: the window's losses, from its first state
            expected, _ = hand_gradient(weights, steps[window_start : t + 1], window_state, losses_from=0)
            assert_close(stage_gradient(stage), expected)
            if window_start:  # the full gradient, through the earlier windows, is another one
                full, _ = hand_gradient(weights, steps[: t + 1], torch.zeros_like(state), losses_from=window_start)
                assert not torch.allclose(full[0], expected[0], rtol=1e-4, atol=1e-6)
            window_start, window_state = t + 1, state
    assert stage.stats.updates == 3  # steps 3, 6 and the last, 8


@pytest.mark.parametrize("cell", ["gru", "elman"])
def test_rtrl_gradient_is_bptt_gradient(cell):
    """Gathered over a sequence with unchanged weights (--update-every 8), forward-mode
    differentiation gives BPTT's gradient: exact, through two recurrent layers and a LayerNorm."""
    gradients = {}
    for rule in ("rtrl", "bptt"):
        config = small_sequence_config(rule=rule, model=rnn_model((5, 4), cell=cell, name="rnn-5x4"))
        run = build_run(tweak(config, schedule={"update_every": STEPS}))
        stage = Stage(run.setups[0])
        stream = run.schedule.microbatches()
        for _ in range(STEPS):
            stage.step(next(stream))
        assert stage.stats.updates == 1
        gradients[rule] = [p.grad.clone() for p in list(stage.blocks.parameters()) + list(stage.rule.parameters())]
    assert_close(gradients["rtrl"], gradients["bptt"])
    assert all(g.abs().sum() > 0 for g in gradients["rtrl"])


def test_rtrl_updates_at_every_step_from_its_influence_matrix():
    run = build_run(small_sequence_config(rule="rtrl"))
    stage = Stage(run.setups[0])
    stream = run.schedule.microbatches()
    stage.step(next(stream))
    influence = stage.rule.influence
    state, parameters = 12 + 10, sum(p.numel() for p in list(stage.blocks.parameters())[:-2])
    assert influence is not None and influence.shape == (32, state, parameters)
    assert stage.stats.updates == 1 and stage.stats.first_update_step == 1
