"""Signal Propagation (Kohan et al. 2022): the label is projected to an input-shaped target that
travels forward through the same blocks as the input; each stage pulls every ``h_i`` towards its
own class's ``t`` and away from the others."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.losses import batch_contrastive_loss, default_temperature, per_class_loss, similarity
from pipeline.messages import Microbatch
from pipeline.model import run_blocks
from pipeline.rules.base import LocalStep, RuleContext, StageRule


class TargetProjection(nn.Module):
    """``t_0 = W c`` for the K one-hot labels, reshaped to the input's shape: one row per class.

    ``learned``: W is trained by its own local loss at the input (each class target pulled towards
    that class's inputs) and by the first layer's loss. ``fixed``: a random projection, never
    updated.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], learned: bool):
        super().__init__()
        self.input_shape = input_shape
        weight = torch.randn(num_classes, math.prod(input_shape)) / math.sqrt(num_classes)
        if learned:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def forward(self) -> torch.Tensor:
        return self.weight.view(-1, *self.input_shape)


class SigPropRule(StageRule):
    def __init__(self, context: RuleContext):
        super().__init__(context)
        config = context.config
        self.target_layer = None
        if context.stage.is_first:
            self.target_layer = TargetProjection(context.num_classes, context.model_input_shape,
                                                 learned=config.target_layer == "learned")

    def scores(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        temperature = self.context.config.temperature or default_temperature(h)
        return similarity(h, targets, temperature)

    def local_loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config = self.context.config
        if config.loss == "per-class":
            return per_class_loss(scores, labels)
        return batch_contrastive_loss(scores, labels, config.positives, config.topk)

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        targets, loss = mb.targets, None
        if self.target_layer is not None:
            targets = self.target_layer()
            learned = isinstance(self.target_layer.weight, nn.Parameter)
            if training and learned and self.context.config.target_loss:
                # The target layer's own local loss, at the input.
                loss = self.local_loss(self.scores(mb.inputs, targets), mb.labels)
        h, t = run_blocks(blocks, mb.inputs, targets)
        scores = self.scores(h, t)
        if training:
            layer_loss = self.local_loss(scores, mb.labels)
            loss = layer_loss if loss is None else loss + layer_loss
            if self.output_head is not None:
                loss = loss + self.head_loss(h, mb.labels)
        return LocalStep(handed_on=mb.handed_on(h, t), loss=loss, features=h, scores=scores.detach())
