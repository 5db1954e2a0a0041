"""Truncated backpropagation through time, TBPTT(k1, k2) (Williams & Peng 1990): the network runs
forward one time step per microbatch; every k1 steps it updates with the gradient of the losses of
the steps since the previous update, backpropagated through the last k2 steps. A sequence's last
step also updates; it may come fewer than k1 steps after the previous update, and its window is
shorter by as much (it reaches k2 - k1 steps before its oldest loss, as every window does).
TBPTT(n, n) over sequences of n steps is BPTT (``--rule bptt``); TBPTT(1, n) updates at every step
with the gradient through all steps so far; TBPTT(k, k) cuts the sequence into windows of k steps.
k2 is at least k1, so that the loss of every step since the previous update lies inside the window
it is backpropagated through.

Like backprop (``--rule bp``) these rules train the whole network as one stage, with its output
layer as part of the network; the rule keeps the recurrent state itself (pipeline/recurrent.py).

How the window is computed: every step runs forward without a graph, from the state the rule keeps,
and the rule remembers the step's input, labels and the state it started from, for the last k2
steps. At an update it recomputes those steps from the remembered state at the window's start, with
a graph, and backpropagates; nothing before the window is reached. Memory therefore grows with k2
(the remembered steps, and the graph of k2 steps at an update), not with the sequence's length.
The steps since the previous update ran with the current weights, so their recomputation is the
forward pass they had; when k2 > k1 the older steps of the window are recomputed with the current
weights rather than the ones they first ran with (their graph could not be kept across an update
anyway: the update changes, in place, the weights that graph holds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from forwardflow.pipeline.messages import Microbatch, Prediction, TimeStep
from forwardflow.pipeline.recurrent import step_blocks, zero_states
from forwardflow.pipeline.rules.base import HEAD, LocalStep, Predictor, Rule, RuleContext, RuleOptions, prediction_of
from forwardflow.pipeline.validation import option


class ThroughTimeRule(Rule):
    """The rules that carry the gradient through time (bptt, tbptt, rtrl): one stage, the output
    layer part of the network, the recurrent state kept by the rule."""

    end_to_end = True
    time_handling = "through-time"

    def __init__(self, context: RuleContext):
        super().__init__(replace(context, head=True))  # the output layer exists whatever the model says
        self.states: list[torch.Tensor] = []

    @classmethod
    def predictors(cls, head: bool) -> tuple[Predictor, ...]:
        return (Predictor(HEAD, cls.head_label),)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        assert self.output_head is not None
        return self.output_head(features.flatten(1))

    def predict(self, mb: Microbatch, step: LocalStep) -> Prediction:
        assert step.scores is not None  # the output layer's outputs, already computed
        return prediction_of(mb, {HEAD: self.target.predict(step.scores)})


@dataclass(frozen=True)
class Remembered:
    """A time step as the window recomputes it."""

    inputs: torch.Tensor
    labels: torch.Tensor
    supervised: bool
    states_before: list[torch.Tensor]  # detached


@dataclass(frozen=True)
class TruncatedBPTTOptions(RuleOptions):
    k1: int = option(1, "tbptt: update every K1 time steps (and at a sequence's last step)", low=1, high=1_000_000)
    k2: int = option(28, "tbptt: backpropagate through the last K2 time steps (at least --k1)", low=1, high=1_000_000)

    def check(self) -> None:
        if self.k2 < self.k1:
            raise self.error(
                "k2",
                f"must be at least --k1 ({self.k1}): the loss of every step since the previous update has to lie "
                f"inside the window it is backpropagated through (got {self.k2})",
            )


class TruncatedBPTTRule(ThroughTimeRule):
    name = "tbptt"
    Options: ClassVar[type[RuleOptions]] = TruncatedBPTTOptions

    def __init__(self, context: RuleContext):
        super().__init__(context)
        self.remembered: deque[Remembered] = deque()
        self.since_update = 0  # training steps since the previous update

    def window(self, time: TimeStep) -> tuple[int, int]:
        """(k1, k2): update every k1 steps, backpropagate through k2."""
        options = self.options
        assert isinstance(options, TruncatedBPTTOptions)
        return options.k1, options.k2

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        time = mb.time
        assert time is not None  # checked: this rule learns from sequence data only
        if time.step == 0:
            self.states = zero_states(blocks, mb.size, mb.inputs)
            self.remembered.clear()
            self.since_update = 0
        before = self.states
        with torch.no_grad():  # the forward pass of the step; the window keeps what it needs
            features, self.states = step_blocks(blocks, mb.inputs, before)
            scores = self.logits(features)
        loss = None
        if training:
            k1, k2 = self.window(time)
            self.remembered.append(Remembered(mb.inputs, mb.labels, time.supervised, before))
            while len(self.remembered) > k2:
                self.remembered.popleft()
            self.since_update += 1
            if self.since_update == k1 or time.last:
                loss = self.window_loss(blocks, self.since_update, self.since_update + k2 - k1)
                self.since_update = 0
        return LocalStep(handed_on=mb.handed_on(features, None), loss=loss, features=features, scores=scores)

    def window_loss(self, blocks: nn.ModuleList, recent: int, length: int) -> torch.Tensor | None:
        """The last ``length`` remembered steps run again with a graph, from the state before the
        first of them; the sum of the losses of the supervised steps among the last ``recent``
        (None if none)."""
        steps = list(self.remembered)[-length:]
        states = steps[0].states_before
        total = None
        for position, step in enumerate(steps):
            features, states = step_blocks(blocks, step.inputs, states)
            if position >= len(steps) - recent and step.supervised:
                loss = self.target.head_loss(self.logits(features), step.labels)
                total = loss if total is None else total + loss
        return total
