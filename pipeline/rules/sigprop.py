"""Signal Propagation (Kohan et al. 2022): the label is projected to an input-shaped target that
travels forward through the same blocks as the input; each stage pulls every ``h_i`` towards its
own class's ``t`` and away from the others."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from forwardflow.pipeline.losses import (
    batch_contrastive_loss,
    default_temperature,
    full_precision,
    per_class_loss,
    similarity,
)
from forwardflow.pipeline.messages import Microbatch
from forwardflow.pipeline.model import layer_sizes, recomputable_tail, run_blocks
from forwardflow.pipeline.rules.base import LocalStep, Predictor, Rule, RuleContext, RuleOptions, learns_from
from forwardflow.pipeline.validation import option

MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SigPropOptions(RuleOptions):
    loss: str = option(
        "contrastive",
        "local loss: batch contrastive, or cross-entropy against the class targets",
        choices=("contrastive", "per-class"),
    )
    positives: str = option(
        "all", "contrastive loss: which same-label samples count as positives", choices=("all", "one", "topk")
    )
    topk: int = option(4, "--positives topk: how many", low=1, high=65536)
    temperature: float = option(
        0.0, "scores are <h, t> / temperature (0: sqrt of the features per position)", low=0.0, high=1e6
    )
    target_layer: str = option(
        "learned", "the label's projection to the input: learned, or fixed random", choices=("learned", "fixed")
    )
    target_loss: bool = option(True, "a learned target layer also learns from its own local loss at the input")
    loss_at: str = option(
        "stage",
        "where the local losses are: after a stage's last layer (the gradient crosses the stage's "
        "layers), or after each layer (every layer learns from its own, as in a stage of its own)",
        choices=("stage", "layer"),
    )
    recompute: bool = option(
        False,
        "keep less for the backward pass: each local loss's tail (the blocks without running "
        "statistics or random draws after its last weight block, such as LayerNorm and pooling, "
        "the scores and the output head) runs again in the backward pass instead of keeping its "
        "activations; same numbers, more compute",
    )

    def check(self) -> None:
        if 0 < self.temperature < MIN_TEMPERATURE:
            # Scores of unit-scale features divided by less overflow float32 (inf, then NaN).
            raise self.error(
                "temperature", f"must be 0 (the default) or at least {MIN_TEMPERATURE:g} (got {self.temperature:g})"
            )
        if self.loss == "per-class" and self.positives != "all":
            raise self.error(
                "positives",
                "chooses the positives of --loss contrastive; --loss per-class "
                "scores each sample against one target per class",
            )


class TargetProjection(nn.Module):
    """``t_0 = W c`` for the K one-hot labels, reshaped to the input's shape: one row per class.

    ``learned``: W is trained by its own local loss at the input (each class target pulled towards
    that class's inputs) and by the first layer's loss. ``fixed``: a random projection, never
    updated.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], learned: bool):
        super().__init__()
        self.input_shape = input_shape
        self.learned = learned
        weight = torch.randn(num_classes, math.prod(input_shape)) / math.sqrt(num_classes)
        if learned:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def forward(self) -> torch.Tensor:
        return self.weight.view(-1, *self.input_shape)


class SigPropRule(Rule):
    name = "sigprop"
    Options = SigPropOptions
    own_predictors = (Predictor("nearest_target", "nearest target"),)

    def __init__(self, context: RuleContext):
        super().__init__(context)
        self.target_layer = None
        if context.stage.is_first:
            self.target_layer = TargetProjection(
                context.num_classes, context.model_input_shape, learned=self.sigprop.target_layer == "learned"
            )
        # The runs of the stage's blocks that end in a local loss: the whole stage, or each of its
        # layers. One backward pass and one optimizer step per microbatch either way; with a loss
        # per layer the layers' gradients are independent, as if each were a stage of its own.
        self.loss_groups = [slice(None)]
        if self.sigprop.loss_at == "layer":
            ends = list(itertools.accumulate(layer_sizes(context.stage.blocks)))
            self.loss_groups = [slice(start, end) for start, end in zip([0, *ends], ends)]
        # Where each group's tail starts, the part run again in its backward pass (--recompute);
        # the group's length: none. The stage builds one module per block spec, so the specs say.
        specs = context.stage.blocks
        self.tail_starts = [
            recomputable_tail(specs[group]) if self.sigprop.recompute else len(specs[group])
            for group in self.loss_groups
        ]

    @property
    def sigprop(self) -> SigPropOptions:
        assert isinstance(self.context.options, SigPropOptions)
        return self.context.options

    def scores(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        temperature = self.sigprop.temperature or default_temperature(h)
        return similarity(h, targets, temperature)

    def local_loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        options = self.sigprop
        if options.loss == "per-class":
            return per_class_loss(scores, labels)
        return batch_contrastive_loss(scores, labels, options.positives, options.topk)

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        targets, loss = mb.targets, None
        classes = self.target.classes_of(mb.labels)  # a real-valued target: its bin
        learns = learns_from(mb, training)
        if self.target_layer is not None:
            targets = self.target_layer()
            if learns and self.target_layer.learned and self.sigprop.target_loss:
                # The target layer's own local loss, at the input.
                loss = self.local_loss(self.scores(mb.inputs, targets), classes)
        # Sequence data: the class targets enter at every time step beside x_t and go through the
        # same recurrent blocks, with states of their own (pipeline/recurrent.py).
        assert targets is not None, "the first stage projects the targets; every later one receives them"
        h, t = mb.inputs, targets
        layers = tuple(blocks)  # sliced per loss group below (a tuple slices without building modules)
        last = len(self.loss_groups) - 1
        settled = head_loss = None
        for number, group in enumerate(self.loss_groups):
            if number:
                # The next layer's loss must not reach this one: cut as between two stages.
                h, t = h.detach(), t.detach()
            if not learns:
                h, t = run_blocks(layers[group], h, t)
                if number == last:  # evaluation scores the stage's output only
                    scores = self.scores(h, t)
                continue
            group_blocks, cut = layers[group], self.tail_starts[number]
            h, t = run_blocks(group_blocks[:cut], h, t)
            head_labels = mb.labels if number == last and self.output_head is not None else None
            if cut < len(group_blocks):
                # Activation checkpointing of the tail: autograd keeps the tail's input only and
                # runs the tail, the scores and the head again in this group's backward pass.
                # Those blocks are deterministic (model.RECOMPUTABLE_KINDS), so the second run
                # gives the values of the first and the gradients are unchanged; no RNG state to
                # keep. The checkpoint also restores this forward's autocast state.
                h, t, scores, layer_loss, head_loss = checkpoint(
                    self._group_loss,
                    group_blocks[cut:],
                    h,
                    t,
                    classes,
                    head_labels,
                    use_reentrant=False,
                    preserve_rng_state=False,
                )
            else:
                h, t, scores, layer_loss, head_loss = self._group_loss((), h, t, classes, head_labels)
            loss = layer_loss if loss is None else loss + layer_loss
            if number < last:
                # Settle this layer's loss now: the cut above means no later loss reaches its
                # graph, so its gradients are the same, and its activations are freed before
                # the next layer runs (one layer's alive at a time, not the stage's). The
                # backward pass runs outside bfloat16 autocast, as the stage's own does.
                with torch.autocast(h.device.type, enabled=False):
                    loss.backward()
                part = loss.detach()
                settled = part if settled is None else settled + part
                loss = None
        if head_loss is not None:
            assert loss is not None
            loss = loss + head_loss
        return LocalStep(
            handed_on=mb.handed_on(h, t), loss=loss, features=h, scores=self.predicting(scores, h, t), settled=settled
        )

    def _group_loss(
        self,
        tail: Sequence[nn.Module],
        h: torch.Tensor,
        t: torch.Tensor,
        classes: torch.Tensor,
        head_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The end of one loss group: its ``tail`` blocks, its scores and local loss, and the
        output head's loss where ``head_labels`` are given (the stage's last group, in the last
        stage): ``(h, t, scores, loss, head_loss)``."""
        if tail:
            h, t = run_blocks(tail, h, t)
        scores = self.scores(h, t)
        head_loss = None if head_labels is None else self.head_loss(h, head_labels)
        return h, t, scores, self.local_loss(scores, classes), head_loss

    def predicting(self, scores: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The scores the stage predicts from (nearest target), detached. Under bfloat16 autocast
        they are scored again in float32: bfloat16 keeps 8 bits of mantissa, so the scores of
        close classes tie, and argmax then picks the first of them (class 0) for every tie. B x K
        products: cheap beside the layers."""
        if scores.dtype == torch.float32:
            return scores.detach()
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            return self.scores(full_precision(h.detach()), full_precision(t.detach()))

    def own_outputs(self, mb: Microbatch, step: LocalStep) -> dict[str, torch.Tensor]:
        assert step.scores is not None
        return {"nearest_target": self.target.from_classes(step.scores.argmax(1))}
