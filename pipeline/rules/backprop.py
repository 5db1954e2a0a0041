"""The end-to-end backpropagation baseline: the whole network is one stage whose only loss is the
cross-entropy of its output layer, so gradients flow through every block, as in ordinary training.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from forwardflow.pipeline.messages import Microbatch, Prediction
from forwardflow.pipeline.model import run_blocks
from forwardflow.pipeline.rules.base import HEAD, LocalStep, Predictor, Rule, RuleContext, prediction_of


class BackpropRule(Rule):
    name = "bp"
    end_to_end = True
    time_handling = ""
    why_not_sequences = (
        "it backpropagates through the blocks of one time step; --rule bptt or --rule tbptt carry the gradient "
        "through time"
    )

    def __init__(self, context: RuleContext):
        # The output layer is part of the network here, not an optional probe.
        super().__init__(replace(context, head=True))

    @classmethod
    def predictors(cls, head: bool) -> tuple[Predictor, ...]:
        return (Predictor(HEAD, cls.head_label),)  # the output layer exists whatever the model says

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        assert self.output_head is not None
        h, _ = run_blocks(blocks, mb.inputs, None)
        logits = self.output_head(h.flatten(1))  # not detached: this is end-to-end training
        loss = self.target.head_loss(logits, mb.labels) if training else None
        return LocalStep(handed_on=mb.handed_on(h, None), loss=loss, features=h, scores=logits.detach())

    def predict(self, mb: Microbatch, step: LocalStep) -> Prediction:
        assert step.scores is not None  # the output layer's logits, already computed
        return prediction_of(mb, {HEAD: self.target.predict(step.scores)})
