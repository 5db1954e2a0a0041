"""Error forward-propagation (Kohan, Rietman & Siegelmann 2018): the output error is fed back into
the input layer through one fixed loop connection, travels forward through the very same weights
as the data, and each layer learns from the difference between its activations with and without
that error. No backward path exists between layers.

In the pipeline:

1. For every training microbatch i the last stage returns its output error
   ``e_i = softmax(logits_i) - onehot(y_i)`` (``Prediction.feedback``).
2. The training loop hands it to :class:`ErrorFeedback`, which attaches the *replay* of
   microbatch i to a later training microbatch as its ``context``: 2B rows, the clean inputs
   ``x_i`` and the error-modulated inputs ``x_i - P e_i``, where ``P`` (K classes -> input values) is
   the fixed random loop connection.
3. Every stage runs its blocks on its own microbatch, then on the replay (clean and modulated rows
   together, in eval mode: batch norm uses its running statistics and dropout is off, so the two
   passes differ by the fed-back error only), and hands all rows on. Its local loss is
   ``1/2 mean_i ||h_clean_i - sg(h_mod_i)||^2``: the clean activations move towards those that the
   error-corrected input produces. The contrast ``h_clean - h_mod ~ J_l P e_i`` stands in for the
   gradient at the stage's output: the error reaches the stage through the forward weights before
   it (``J_l``, the forward Jacobian), much as in direct feedback alignment with a feedback matrix
   made of the network's own forward path. Like there, it helps only as far as the output head
   comes to align with that path (measured on MNIST: cosine ~0.2 with the true gradient at the
   last stage after two epochs).
4. The output head learns by cross-entropy on the last stage's detached features; its error is what
   is fed back.

Delay. The error of a microbatch exists only once it has left the last stage, so it is fed back to
the microbatch submitted ``delay`` training microbatches later, ``delay = --window``. The Ray
driver keeps at most ``window`` microbatches in flight: before it submits stream position ``j`` it
has already collected position ``j - window``. The error of training microbatch ``i`` is therefore
always in hand when the training microbatch ``delay`` training microbatches later is submitted
(evaluation microbatches in between only widen the gap), and the feedback costs no pause. The
sequential runner uses the same delay, so both executors compute the same thing bit for bit. The
price: the replay of microbatch i is learned from with weights ``delay`` updates newer than those
that made its error (the error is ``delay`` microbatches stale); the first ``delay`` training
microbatches carry no replay (their stages only train the output head) and the errors of the last
``delay`` are not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from forwardflow.pipeline.messages import TRAIN, Microbatch, MicrobatchPlan, Prediction
from forwardflow.pipeline.model import run_blocks
from forwardflow.pipeline.rules.base import Feedback, LocalStep, Rule, RuleOptions
from forwardflow.pipeline.validation import option

if TYPE_CHECKING:
    from forwardflow.pipeline.config import RunConfig


@dataclass(frozen=True)
class ErrorForwardOptions(RuleOptions):
    # An error of norm ~1 (an untrained output) shifts each input value by about this much, against
    # inputs normalised to std 1: large enough to change the activations measurably, small enough
    # that the contrast stays close to linear.
    feedback_scale: float = option(
        0.5, "standard deviation of the fixed loop connection's entries (output error -> input)", low=1e-6, high=1e3
    )


class ErrorFeedback(Feedback):
    """The loop from the output back to the front: keeps the plans of in-flight training
    microbatches and the errors that have come back, and attaches replays ``delay`` training
    microbatches later. Holds at most ``delay`` + window errors."""

    def __init__(self, delay: int, num_classes: int, input_shape: tuple[int, ...], seed: int, scale: float):
        self.delay = delay
        generator = torch.Generator().manual_seed(seed * 1000 + 977)
        self.projection = torch.randn(num_classes, math.prod(input_shape), generator=generator) * scale
        self._position = 0  # training microbatches attached so far
        self._in_flight: dict[int, tuple[int, MicrobatchPlan]] = {}  # stream index -> (position, plan)
        self._errors: dict[int, tuple[MicrobatchPlan, torch.Tensor]] = {}  # position -> (plan, error)

    def on_prediction(self, prediction: Prediction) -> None:
        entry = self._in_flight.pop(prediction.index, None)
        if entry is not None and prediction.feedback is not None:
            position, plan = entry
            self._errors[position] = (plan, prediction.feedback)

    def ready(self, plan: MicrobatchPlan) -> bool:
        source = self._position - self.delay
        return plan.phase != TRAIN or source < 0 or source in self._errors

    def attach(self, plan: MicrobatchPlan, inputs_of: Callable[[MicrobatchPlan], torch.Tensor]) -> MicrobatchPlan:
        if plan.phase != TRAIN:
            return plan
        position = self._position
        self._position += 1
        self._in_flight[plan.index] = (position, plan)
        found = self._errors.pop(position - self.delay, None)
        if found is None:
            return plan
        replayed, error = found
        # Where the error is (the last stage's device in the sequential runner, the host with Ray):
        # the inputs are copied there without waiting, and the replay goes to the first stage.
        inputs = inputs_of(replayed).to(error.device, non_blocking=True)
        if self.projection.device != error.device:
            self.projection = self.projection.to(error.device)
        modulated = inputs - (error @ self.projection).view_as(inputs)
        return replace(plan, context=torch.cat([inputs, modulated]))

    def state_dict(self) -> dict[str, Any]:
        # At a cut nothing is in flight: the inputs kept are those whose errors came back and
        # wait to be fed to a later microbatch.
        # Plans as plain dicts of tensors, which a checkpoint loads without unpickling code.
        return {
            "position": self._position,
            "in_flight": {index: (position, _plain(plan)) for index, (position, plan) in self._in_flight.items()},
            "errors": {position: (_plain(plan), error) for position, (plan, error) in self._errors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position = state["position"]
        self._in_flight = {
            index: (position, MicrobatchPlan(**plan)) for index, (position, plan) in state["in_flight"].items()
        }
        self._errors = {
            position: (MicrobatchPlan(**plan), error) for position, (plan, error) in state["errors"].items()
        }


def _plain(plan: MicrobatchPlan) -> dict[str, Any]:
    assert plan.time is None  # efp does not learn from sequences
    return {f.name: getattr(plan, f.name) for f in fields(plan) if f.name != "time"}


class ErrorForwardRule(Rule):
    """No targets: the output head's error, fed back to the front, is what every stage learns from;
    the head is also the prediction (the model must have one)."""

    name = "efp"
    Options = ErrorForwardOptions
    uses_window = True
    time_handling = ""
    why_not_sequences = (
        "the replay of a microbatch comes back --window microbatches later, when the recurrent state of its time "
        "step is gone"
    )
    learns_values = False  # the error fed back is softmax minus one-hot

    @classmethod
    def make_feedback(cls, config: RunConfig, num_classes: int, input_shape: tuple[int, ...]) -> ErrorFeedback:
        options = config.rule.options
        assert isinstance(options, ErrorForwardOptions)
        return ErrorFeedback(
            config.execution.pipeline_window, num_classes, input_shape, config.seed, options.feedback_scale
        )

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        h, _ = run_blocks(blocks, mb.inputs, None)
        replay = None
        if mb.context is not None:
            # The replay runs in eval mode: batch norm uses its running statistics (the
            # error-modulated rows must not shift them, nor normalise the clean rows differently
            # from the modulated ones) and dropout draws no mask, so the two passes differ by the
            # fed-back error only. Gradients still flow.
            blocks.eval()
            replay, _ = run_blocks(blocks, mb.context, None)
            blocks.train(training)
        loss = None
        if training:
            if replay is not None:
                clean, modulated = replay.chunk(2)
                loss = 0.5 * (clean - modulated.detach()).pow(2).flatten(1).sum(1).mean()
            else:
                loss = h.sum() * 0.0  # nothing fed back yet: the blocks get no update signal
            if self.output_head is not None:
                loss = loss + self.head_loss(h, mb.labels)
        scores = None
        if self.output_head is not None:
            scores = self.output_head(h.detach().flatten(1)).detach()
        return LocalStep(
            handed_on=mb.handed_on(h, None, context=replay),
            loss=loss,
            features=h,
            scores=scores,
            tracked=replay is not None,
        )

    def training_report(self, mb: Microbatch, step: LocalStep) -> Prediction:
        report = super().training_report(mb, step)
        assert self.output_head is not None
        with torch.no_grad():
            # The stage reports after its update: the error fed back is the updated head's.
            logits = self.output_head(step.features.detach().flatten(1))
            report.feedback = F.softmax(logits, 1) - F.one_hot(mb.labels, logits.shape[1]).to(logits.dtype)
        return report
