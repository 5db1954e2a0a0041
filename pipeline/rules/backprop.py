"""The end-to-end backpropagation baseline: the whole network is one stage whose only loss is the
cross-entropy of its output layer, so gradients flow through every block, as in ordinary training.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from forwardflow.pipeline.messages import Microbatch, Prediction
from forwardflow.pipeline.model import run_blocks
from forwardflow.pipeline.rules.base import HEAD, LocalStep, Predictor, Rule, RuleContext


class BackpropRule(Rule):
    name = "bp"
    end_to_end = True

    def __init__(self, context: RuleContext):
        # The output layer is part of the network here, not an optional probe.
        super().__init__(
            RuleContext(context.options, context.stage, context.num_classes, context.model_input_shape, head=True)
        )

    @classmethod
    def predictors(cls, head: bool) -> tuple[Predictor, ...]:
        return (Predictor(HEAD, cls.head_label),)  # the output layer exists whatever the model says

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        assert self.output_head is not None
        h, _ = run_blocks(blocks, mb.inputs, None)
        logits = self.output_head(h.flatten(1))  # not detached: this is end-to-end training
        loss = F.cross_entropy(logits, mb.labels) if training else None
        return LocalStep(handed_on=mb.handed_on(h, None), loss=loss, features=h, scores=logits.detach())

    def predict(self, mb: Microbatch, step: LocalStep) -> Prediction:
        assert step.scores is not None  # the output layer's logits, already computed
        return Prediction(
            index=mb.index, phase=mb.phase, epoch=mb.epoch, labels=mb.labels, outputs={HEAD: step.scores.argmax(1)}
        )
