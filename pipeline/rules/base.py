"""What a learning rule is: one class that owns everything about it.

A rule class declares its name, its options (a config section of its own, whose flags the command
line accepts only with that rule), its checks against a model and data, the feedback loop from the
output back to the front of the pipeline if it has one, and its predictions: which ones it makes,
how reports label them, and which one is its own (the primary). Reports, summaries, the progress
bar and the benchmarks ask the rule class; nothing outside ``pipeline/rules/`` tests a rule's name.

An *instance* is the rule's part of one stage: a module holding the rule's own parameters (a target
layer in the first stage, an output head in the last), computing the stage's local loss from the
stage's own forward pass and saying what to hand on. The stage owns the blocks, the optimizer and
the update; the rule never sees another stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from forwardflow.pipeline.losses import full_precision
from forwardflow.pipeline.messages import Microbatch, MicrobatchPlan, Prediction
from forwardflow.pipeline.model import StageSpec
from forwardflow.pipeline.targets import TargetSpec
from forwardflow.pipeline.validation import ConfigError, Section

if TYPE_CHECKING:
    from forwardflow.pipeline.config import RunConfig

HEAD = "head"  # the predictor key of the linear output layer


@dataclass(frozen=True)
class RuleOptions(Section):
    """A rule's own options; rules without any use this empty section."""


@dataclass(frozen=True)
class Predictor:
    """One kind of prediction a rule makes: its key in ``Prediction.outputs`` and its label."""

    key: str
    label: str


@dataclass
class LocalStep:
    """The result of one stage's forward pass under a rule."""

    handed_on: Microbatch  # detached: what the next stage receives
    loss: torch.Tensor | None  # the local loss still to go backward (None for evaluation microbatches)
    features: torch.Tensor  # this stage's h, for prediction in the last stage
    scores: torch.Tensor | None = None  # per-class scores of this stage (its own training accuracy)
    # Whether the loss is on the scale of the stage's loss in the long run, which the divergence
    # watch compares it with (efp: not before the first error comes back and its replay term).
    tracked: bool = True
    # Loss parts whose backward pass the rule has already run (detached): with a loss per layer,
    # each layer's activations are freed before the next layer runs.
    settled: torch.Tensor | None = None

    def whole_loss(self) -> torch.Tensor | None:
        """The whole local loss, detached: the settled parts plus the part still to go backward."""
        if self.loss is None:
            return self.settled
        return self.loss.detach() if self.settled is None else self.settled + self.loss.detach()


@dataclass(frozen=True)
class RuleContext:
    """What a rule needs to know about its stage and the data."""

    options: RuleOptions
    stage: StageSpec
    num_classes: int
    model_input_shape: tuple[int, ...]
    head: bool
    target: TargetSpec | None = None  # the task's targets; None: num_classes classes


class Feedback:
    """The training loop's hook for a rule that feeds predictions back to the front of the pipeline
    (error forward-propagation). The default feeds nothing back.

    The loop calls ``on_prediction`` for every prediction, asks ``ready`` before submitting a
    microbatch (False only when what it must carry has not come back yet: the loop then drains
    the pipeline), and submits ``attach(plan, inputs_of)`` instead of ``plan``; ``inputs_of`` gives
    the (augmented) inputs of a plan on the host.
    """

    def on_prediction(self, prediction: Prediction) -> None:
        """Take what the rule feeds back from a finished microbatch."""

    def ready(self, plan: MicrobatchPlan) -> bool:
        return True

    def attach(self, plan: MicrobatchPlan, inputs_of: Callable[[MicrobatchPlan], torch.Tensor]) -> MicrobatchPlan:
        return plan

    def state_dict(self) -> dict[str, Any]:
        """What the loop holds, for a checkpoint (the training loop takes it at a cut, with every
        microbatch up to the cut submitted and its prediction taken, none after)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``state_dict()``."""


class Rule(nn.Module):
    """Base class: a linear output head on detached last features, when the model asks for one."""

    name: ClassVar[str]
    Options: ClassVar[type[RuleOptions]] = RuleOptions
    # One stage with gradients through every block (backprop): its default stage count is 1 and
    # more stages are refused.
    end_to_end: ClassVar[bool] = False
    # The rule's feedback loop is --window microbatches long in every executor (efp): --window
    # then applies to sequential runs too.
    uses_window: ClassVar[bool] = False
    # The rule's own prediction first; the output head is added where the model has one.
    own_predictors: ClassVar[tuple[Predictor, ...]] = ()
    head_label: ClassVar[str] = "output head"
    # How the rule learns from sequence data (pipeline/sequence.py, pipeline/recurrent.py):
    # "per-step": like from any microbatch, at every time step; the stage's recurrent blocks carry
    # the state from step to step, detached. "through-time": the rule keeps the recurrent state and
    # carries the gradient through time itself. "": it does not (``why_not_sequences`` says why).
    time_handling: ClassVar[str] = "per-step"
    why_not_sequences: ClassVar[str] = ""
    learns_values: ClassVar[bool] = True  # whether it can learn a real-valued target (regression)

    def __init__(self, context: RuleContext):
        super().__init__()
        self.context = context
        self.output_head: nn.Linear | None = None
        if context.stage.is_last and context.head:
            features = int(torch.Size(context.stage.output_shape).numel())
            self.output_head = nn.Linear(features, self.target.head_outputs)

    # ---------------------------------------------------------------- what the rule declares

    @classmethod
    def predictors(cls, head: bool) -> tuple[Predictor, ...]:
        """Every prediction the rule makes with (``head``) or without an output head; the first
        is the rule's own, the one a run's test accuracy reports."""
        return cls.own_predictors + ((Predictor(HEAD, cls.head_label),) if head else ())

    @classmethod
    def default_stages(cls, num_layers: int) -> int:
        return 1 if cls.end_to_end else num_layers

    @classmethod
    def check(cls, config: RunConfig, num_classes: int, input_shape: tuple[int, ...]) -> None:
        """Raise ConfigError if the rule cannot work with this model and data. Called by the
        builder before any actor starts; rules with requirements extend it."""
        if cls.end_to_end and config.model.stages > 1:
            raise config.model.error("stages", f"rule {cls.name} trains end to end through one stage; use --stages 1")
        if not cls.predictors(config.model.head):
            raise config.model.error("head", f"rule {cls.name} predicts with the output head; the model needs one")
        if config.data.is_sequence and not cls.time_handling:
            raise ConfigError("--rule", f"rule {cls.name} does not learn from sequence data: {cls.why_not_sequences}")
        if cls.time_handling == "through-time" and not config.data.is_sequence:
            raise ConfigError(
                "--rule", f"rule {cls.name} learns through time: it needs sequence data and a recurrent model"
            )
        if config.data.regression and not cls.learns_values:
            raise ConfigError(
                "--rule", f"rule {cls.name} learns classes; --dataset {config.data.dataset} has a real-valued target"
            )

    @classmethod
    def make_feedback(cls, config: RunConfig, num_classes: int, input_shape: tuple[int, ...]) -> Feedback:
        """What the training loop feeds back from the output to the front: nothing, unless the
        rule overrides it."""
        return Feedback()

    # ---------------------------------------------------------------- the rule in one stage

    @property
    def options(self) -> RuleOptions:
        return self.context.options

    @property
    def target(self) -> TargetSpec:
        return self.context.target or TargetSpec(self.context.num_classes)

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        raise NotImplementedError

    def head_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The output head's loss (cross-entropy, or squared error for a real-valued target) on
        *detached* features: it learns to read the last stage without changing it."""
        assert self.output_head is not None
        return self.target.head_loss(self.output_head(features.detach().flatten(1)), labels)

    def own_outputs(self, mb: Microbatch, step: LocalStep) -> dict[str, torch.Tensor]:
        """The rule's own predictions of the last stage, by predictor key."""
        return {}

    def predict(self, mb: Microbatch, step: LocalStep) -> Prediction:
        outputs = self.own_outputs(mb, step)
        if self.output_head is not None:
            features = step.features.detach().flatten(1)
            if torch.is_autocast_enabled(features.device.type):
                # In float32 under bfloat16 autocast too: bfloat16 logits of close classes tie,
                # and argmax would then pick the first of them. One B x K product.
                with torch.autocast(features.device.type, enabled=False):
                    outputs[HEAD] = self.target.predict(self.output_head(full_precision(features)))
            else:
                outputs[HEAD] = self.target.predict(self.output_head(features))
        return prediction_of(mb, outputs)

    def training_report(self, mb: Microbatch, step: LocalStep) -> Prediction:
        """What the last stage sends back for a training microbatch: its place in the stream and
        its labels (progress counts them) and, for a rule with a feedback loop, what is fed back.
        No predicted classes: only evaluation microbatches are scored."""
        return prediction_of(mb, {})

    def after_update(self) -> None:
        """Called after the stage's optimizer step (rules with extra state override it)."""


def prediction_of(mb: Microbatch, outputs: dict[str, torch.Tensor]) -> Prediction:
    """The prediction of microbatch ``mb`` (its place in the stream and in time, and its labels)."""
    return Prediction(index=mb.index, phase=mb.phase, epoch=mb.epoch, labels=mb.labels, outputs=outputs, time=mb.time)


def learns_from(mb: Microbatch, training: bool) -> bool:
    """Whether a rule that learns at every step has a loss for ``mb``: a training microbatch, and
    for sequence data a time step the target applies at (``TimeStep.supervised``)."""
    return training and (mb.time is None or mb.time.supervised)
