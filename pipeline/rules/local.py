"""Local heads, the local-learning family (decoupled greedy learning, DGL; the prediction loss of
predsim): each stage trains a small classifier on its own output by cross-entropy (a regressor by
squared error, for a real-valued target), and the gradient runs through the classifier into the
stage's own blocks and stops there. The target is the label itself; the next stage receives the
output detached. On sequence data every stage does this at every time step, from the state its
recurrent blocks carry (detached) from the step before.

The classifier is linear, or one hidden layer of ``--head-width`` units. For conv stages the
feature map is first average-pooled to 2x2, which keeps the classifier small whatever the map
size (as in DGL's auxiliary nets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from forwardflow.pipeline.messages import Microbatch
from forwardflow.pipeline.model import run_blocks
from forwardflow.pipeline.rules.base import LocalStep, Predictor, Rule, RuleContext, RuleOptions, learns_from
from forwardflow.pipeline.validation import option

POOLED_SIZE = 2  # conv maps are pooled to POOLED_SIZE x POOLED_SIZE before the local classifier


@dataclass(frozen=True)
class LocalOptions(RuleOptions):
    head_width: int = option(0, "hidden units of each stage's classifier (0: linear)", low=0, high=1 << 16)


class LocalHead(nn.Module):
    def __init__(self, features_shape: tuple[int, ...], num_classes: int, hidden: int):
        super().__init__()
        layers: list[nn.Module] = []
        features = math.prod(features_shape)
        if len(features_shape) == 3:
            channels, height, width = features_shape
            pooled = (min(POOLED_SIZE, height), min(POOLED_SIZE, width))
            layers.append(nn.AdaptiveAvgPool2d(pooled))
            features = channels * pooled[0] * pooled[1]
        layers.append(nn.Flatten())
        if hidden:
            layers += [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        else:
            layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class LocalHeadsRule(Rule):
    name = "local"
    Options = LocalOptions
    own_predictors = (Predictor("local_head", "last local head"),)

    def __init__(self, context: RuleContext):
        super().__init__(context)
        assert isinstance(context.options, LocalOptions)
        self.local_head = LocalHead(context.stage.output_shape, self.target.head_outputs, context.options.head_width)

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        h, _ = run_blocks(blocks, mb.inputs, None)
        logits = self.local_head(h)  # not detached: this stage's blocks learn from their own head
        loss = None
        if learns_from(mb, training):
            loss = self.target.head_loss(logits, mb.labels)
            if self.output_head is not None:
                loss = loss + self.head_loss(h, mb.labels)
        return LocalStep(handed_on=mb.handed_on(h, None), loss=loss, features=h, scores=logits.detach())

    def own_outputs(self, mb: Microbatch, step: LocalStep) -> dict[str, torch.Tensor]:
        assert step.scores is not None  # the last stage's own classifier
        return {"local_head": self.target.predict(step.scores)}
