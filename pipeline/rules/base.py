"""What a learning rule contributes to one stage.

A rule is a plug-in of the stage, not a trainer: it owns its own parameters (a target layer in
the first stage, an output head in the last), computes the stage's local loss from the stage's
own forward pass, and says what to hand on. The stage owns the blocks, the optimizer and the
update; the rule never sees another stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import RuleConfig, TrainConfig
from pipeline.messages import Microbatch, Prediction
from pipeline.model import StageSpec


@dataclass
class LocalStep:
    """The result of one stage's forward pass under a rule."""

    handed_on: Microbatch  # detached: what the next stage receives
    loss: torch.Tensor | None  # the local loss (None for evaluation microbatches)
    features: torch.Tensor  # this stage's h, for prediction in the last stage
    scores: torch.Tensor | None = None  # per-class scores of this stage (its own accuracy)


@dataclass(frozen=True)
class RuleContext:
    """What a rule needs to know about its stage and the data."""

    config: RuleConfig
    stage: StageSpec
    num_classes: int
    model_input_shape: tuple[int, ...]
    head: bool


class StageRule(nn.Module):
    """Base class: a linear output head on detached last features, when the model asks for one."""

    def __init__(self, context: RuleContext):
        super().__init__()
        self.context = context
        self.output_head: nn.Linear | None = None
        if context.stage.is_last and context.head:
            features = int(torch.Size(context.stage.output_shape).numel())
            self.output_head = nn.Linear(features, context.num_classes)

    @classmethod
    def check(cls, config: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> None:
        """Raise ConfigError if the rule cannot work with this model and data. Called by the
        launcher before any actor starts; rules with requirements override it."""

    @classmethod
    def make_feedback(cls, config: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> Feedback:
        """What the training loop feeds back from the output to the front: nothing, unless the
        rule overrides it."""
        return Feedback()

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        raise NotImplementedError

    def head_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the output head on *detached* features: it learns to read the last
        stage without changing it."""
        return F.cross_entropy(self.output_head(features.detach().flatten(1)), labels)

    def predict(self, mb: Microbatch, step: LocalStep) -> Prediction:
        scores = step.scores
        head = None
        if self.output_head is not None:
            head = self.output_head(step.features.flatten(1)).argmax(1)
        return Prediction(index=mb.index, phase=mb.phase, epoch=mb.epoch, labels=mb.labels,
                          nearest_target=None if scores is None else scores.argmax(1), head=head)

    def after_update(self) -> None:
        """Called after the stage's optimizer step (rules with extra state override it)."""


class Feedback:
    """The training loop's hook for a rule that feeds predictions back to the front of the pipeline
    (error forward-propagation). The default feeds nothing back.

    The loop calls ``on_prediction`` for every prediction, asks ``ready`` before submitting a
    microbatch (False only when what it must carry has not come back yet: the loop then drains
    the pipeline), and submits ``attach(mb)`` instead of ``mb``.
    """

    def on_prediction(self, prediction: Prediction) -> None:
        """Take what the rule feeds back from a finished microbatch."""

    def ready(self, mb: Microbatch) -> bool:
        return True

    def attach(self, mb: Microbatch) -> Microbatch:
        return mb
