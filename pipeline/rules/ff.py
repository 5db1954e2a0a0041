"""Forward-Forward (Hinton 2022), supervised: each stage learns to give high goodness (the sum of
squared activations) to positive data, which carries the true label, and low goodness to negative
data, which carries a wrong one: ``softplus(theta - G_pos) + softplus(G_neg - theta)``.

``--ff-threshold`` is theta *per unit*: a stage's threshold is that times its features per position
(the width of a fully connected layer, the channels of a conv map, whose goodness is averaged over
positions), so one value suits every width: inputs handed on at unit root-mean-square make the sum
of squares grow with the width. The default, 0.25, is close to the mean square activation of a
fresh ReLU layer (1/6), so both terms of the loss are active from the first step; with 1 per unit
(the threshold of a public reimplementation that reaches 1.45% MNIST test error after 100 epochs)
the stages after the first stayed at chance for the first MNIST epochs here.

What travels between stages, for a microbatch of B samples and K classes:

- ``inputs``: the *neutral* pass (every label slot at 1/K), B rows. The output head learns from it
  and predicts from it in one pass, so no label can leak into that prediction.
- ``context``: training: the positive then the negative pass (2B rows); evaluation: one copy of
  every sample per label (B*K rows, sample-major) for label scanning.
- ``extra["goodness"]``: evaluation only: the (B, K) goodness summed so far over every stage but
  the first (the first stage's goodness mostly reads the label it was given, as Hinton notes).

All rows of a stage go through its blocks as one batch. The goodness is that of the stage's
activity: the output of its last block that is not a normalisation (a trailing LayerNorm would fix
the length of every output, and with it the goodness). Each stage hands its outputs on
length-normalised (unit root-mean-square per sample), so that the next stage cannot reuse this
stage's goodness and has to find features of its own; a trailing LayerNorm already does most of
that, and the rule treats every model the same way.

The label: for a fully connected first layer the one-hot is written into the first K input values
(Hinton's choice for MNIST, where those pixels are background); for a conv first layer it is K
constant channels concatenated to the image. A conv over concatenated channels is the conv of the
image plus a conv of the label channels, so the first stage's rule owns the label part of that
weight (``label_conv``) and adds it to the first conv's output: the model's blocks keep the data's
shape and the stage plan is the same for every rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from forwardflow.pipeline.losses import forward_forward_loss, goodness
from forwardflow.pipeline.messages import Microbatch
from forwardflow.pipeline.model import BLOCKS, LAYER_KINDS, BlockSpec, StageSpec, build_block
from forwardflow.pipeline.rules.base import LocalStep, Predictor, Rule, RuleContext, RuleOptions
from forwardflow.pipeline.validation import ConfigError, option

if TYPE_CHECKING:
    from forwardflow.pipeline.config import RunConfig

# The value of the true label's slot, against inputs normalised to mean 0 / std 1 per channel: about
# twice the brightest MNIST pixel (2.8), so that the label has a strong say from the first steps
# (scan accuracy after one MNIST epoch: 84% with 1.0, 89% with 6.0, no better with 10).
LABEL_VALUE = 6.0
# Label scanning multiplies the rows of an evaluation microbatch by K: blocks run on at most this
# many rows at a time (without gradient, in eval mode, so chunks give the same result as one batch).
EVAL_CHUNK_ROWS = 4096


NORMALISATIONS = ("layernorm", "batchnorm")


@dataclass(frozen=True)
class ForwardForwardOptions(RuleOptions):
    threshold: float = option(0.25, "goodness threshold theta, per unit", flag="--ff-threshold", low=0.0, high=1e6)
    hard_negatives: bool = option(
        False,
        "negatives carry the most confusable wrong label instead of a random one "
        "(on in the ff presets; --no-hard-negatives: random)",
    )


def activity_position(blocks: tuple[BlockSpec, ...]) -> int:
    """The last block whose output carries the goodness: trailing normalisations are skipped."""
    position = len(blocks) - 1
    while position > 0 and blocks[position].kind in NORMALISATIONS:
        position -= 1
    return position


def first_layer(blocks: tuple[BlockSpec, ...]) -> tuple[int, BlockSpec]:
    """Position and spec of the first linear or conv block."""
    for position, spec in enumerate(blocks):
        if spec.kind in LAYER_KINDS:
            return position, spec
    raise ConfigError(BLOCKS, "needs at least one linear or conv block")


def normalise(h: torch.Tensor) -> torch.Tensor:
    """Length normalisation to unit root-mean-square per sample: the direction is handed on, the
    length (this stage's goodness) is not."""
    rms = h.pow(2).flatten(1).mean(1).add(1e-8).sqrt()
    return h / rms.view(-1, *([1] * (h.dim() - 1)))


def wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn wrong label per sample: the true label shifted by 1..K-1 modulo K, so it is
    never the true one, by construction rather than by rejection."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    # Drawn on the host (the stage's own generator, the same on every device); the copy to a GPU
    # is queued, not waited for.
    return (labels + shift.to(labels.device, non_blocking=True)) % num_classes


def hardest_wrong_labels(goodness_per_label: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The most confusable wrong label: the one with the highest goodness besides the true one."""
    masked = goodness_per_label.scatter(1, labels[:, None], float("-inf"))
    return masked.argmax(1)


def all_labels(rows: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """One-hot label rows, K per sample, sample-major (row b*K + k carries label k)."""
    return torch.eye(num_classes, device=device).repeat(rows, 1)


class LabelInput(nn.Module):
    """Puts label rows (one-hot, or 1/K in every slot for the neutral label) into the first stage."""

    def __init__(self, spec: StageSpec, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.position, layer = first_layer(spec.blocks)
        self.label_conv: nn.Conv2d | None = None
        if layer.kind == "conv":
            self.label_conv = nn.Conv2d(num_classes, layer.width, layer.kernel_size, padding=layer.padding, bias=False)

    def write(self, x: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
        """Fully connected first layer: the label in the first K input values."""
        flat = x.flatten(1).clone()
        flat[:, : self.num_classes] = label_rows * LABEL_VALUE
        return flat.view_as(x)

    def conv_part(self, spatial: tuple[int, int], label_rows: torch.Tensor) -> torch.Tensor:
        """Conv first layer: what K constant label channels add to its output. conv(sum_k l_k e_k)
        = sum_k l_k conv(e_k): the K label maps go through the conv once and are mixed per row."""
        assert self.label_conv is not None
        basis = torch.eye(self.num_classes, device=label_rows.device)[:, :, None, None]
        maps = self.label_conv(basis.expand(-1, -1, *spatial) * LABEL_VALUE)
        return torch.einsum("bk,kchw->bchw", label_rows, maps)


class ForwardForwardRule(Rule):
    name = "ff"
    Options = ForwardForwardOptions
    own_predictors = (Predictor("scan", "label scan"),)
    head_label = "one pass"  # the output head reads the neutral-label pass
    time_handling = ""
    why_not_sequences = (
        "it writes the label into the first input values of every step (a third of an MNIST row), its label "
        "scan would need one recurrent state per sequence and label, and its hard negatives a scan with states "
        "of their own"
    )
    learns_values = False

    def __init__(self, context: RuleContext):
        super().__init__(context)
        assert isinstance(context.options, ForwardForwardOptions)
        self.ff = context.options
        stage = context.stage
        self.label_input = LabelInput(stage, context.num_classes) if stage.is_first else None
        self.activity_position = activity_position(stage.blocks)
        self.threshold = self.ff.threshold * self._units_per_position(stage)
        self.generator = None
        if stage.is_first:
            # The stage builds its rule under its own seed, so this draw makes the negatives'
            # generator the stage's own: every executor draws the same wrong labels.
            self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        # Label scanning sums goodness over the stages after the first; a one-stage model has only
        # the first.
        self.scores_goodness = not stage.is_first or stage.num_stages == 1

    def _units_per_position(self, stage: StageSpec) -> int:
        shape = stage.input_shape
        for spec in stage.blocks[: self.activity_position + 1]:
            _, shape = build_block(spec, shape)
        return shape[0]

    @classmethod
    def check(cls, config: RunConfig, num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().check(config, num_classes, input_shape)
        if num_classes < 2:
            raise ConfigError("--dataset", "rule ff draws a wrong label for every negative: it needs 2 or more classes")
        _, layer = first_layer(config.model.blocks)
        values = math.prod(input_shape)
        if layer.kind == "linear" and values <= num_classes:
            raise ConfigError(
                "--rule",
                f"ff writes the label into the first {num_classes} input values, but the "
                f"input of model {config.model.name} has only {values} ({input_shape}); "
                f"it needs more than {num_classes} values, or a conv first layer",
            )

    def _run(
        self, blocks: nn.ModuleList, x: torch.Tensor, label_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(activity, output) of the stage's blocks; the first stage puts the labels in."""
        label_input = self.label_input if label_rows is not None else None
        labels_by_conv = label_input is not None and label_input.label_conv is not None
        if label_input is not None and label_rows is not None and not labels_by_conv:
            x = label_input.write(x, label_rows)
        activity = x
        for position, block in enumerate(blocks):
            out = block(x)
            if (
                label_input is not None
                and label_rows is not None
                and labels_by_conv
                and position == label_input.position
            ):
                out = out + label_input.conv_part((x.shape[-2], x.shape[-1]), label_rows)
            x = out
            if position == self.activity_position:
                activity = x
        return activity, x

    def _blocks(
        self, blocks: nn.ModuleList, x: torch.Tensor, label_rows: torch.Tensor | None, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if training or x.shape[0] <= EVAL_CHUNK_ROWS:
            return self._run(blocks, x, label_rows)
        parts = [
            self._run(
                blocks,
                x[start : start + EVAL_CHUNK_ROWS],
                None if label_rows is None else label_rows[start : start + EVAL_CHUNK_ROWS],
            )
            for start in range(0, x.shape[0], EVAL_CHUNK_ROWS)
        ]
        return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])

    def _negatives(self, blocks: nn.ModuleList, mb: Microbatch) -> torch.Tensor:
        num_classes = self.context.num_classes
        if not self.ff.hard_negatives:
            assert self.generator is not None  # the first stage's, where negatives are drawn
            return wrong_labels(mb.labels, num_classes, self.generator)
        # Scan the labels through this stage alone (the only goodness it can see), without
        # gradient and in eval mode so that no normalisation statistic moves.
        blocks.eval()
        with torch.no_grad():
            scan = mb.inputs.repeat_interleave(num_classes, 0)
            activity, _ = self._blocks(blocks, scan, all_labels(mb.size, num_classes, scan.device), training=False)
        blocks.train()
        return hardest_wrong_labels(goodness(activity).view(mb.size, num_classes), mb.labels)

    def _first_stage_rows(self, blocks: nn.ModuleList, mb: Microbatch, training: bool):
        size, num_classes, x = mb.size, self.context.num_classes, mb.inputs
        neutral = torch.full((size, num_classes), 1.0 / num_classes, device=x.device)
        if training:
            negative = self._negatives(blocks, mb)
            labels = torch.cat(
                [neutral, F.one_hot(mb.labels, num_classes).float(), F.one_hot(negative, num_classes).float()]
            )
            return torch.cat([x, x, x]), labels
        labels = torch.cat([neutral, all_labels(size, num_classes, x.device)])
        return torch.cat([x, x.repeat_interleave(num_classes, 0)]), labels

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        size = mb.size
        if self.label_input is not None:
            rows, label_rows = self._first_stage_rows(blocks, mb, training)
        else:
            assert mb.context is not None  # the positive and negative (or label-scan) rows
            rows, label_rows = torch.cat([mb.inputs, mb.context]), None
        activity, h = self._blocks(blocks, rows, label_rows, training)
        neutral, others = h[:size], h[size:]
        loss, extra = None, None
        if training:
            positive, negative = activity[size : 2 * size], activity[2 * size :]
            loss = forward_forward_loss(goodness(positive), goodness(negative), self.threshold)
            if self.output_head is not None:
                loss = loss + self.head_loss(neutral, mb.labels)
        else:
            total = mb.extra.get("goodness")
            if total is None:
                total = torch.zeros(size, self.context.num_classes, device=h.device)
            if self.scores_goodness:
                total = total + goodness(activity[size:]).view(size, self.context.num_classes)
            extra = {"goodness": total}
        handed_on = mb.handed_on(normalise(neutral), None, context=normalise(others), extra=extra)
        return LocalStep(handed_on=handed_on, loss=loss, features=neutral)

    def own_outputs(self, mb: Microbatch, step: LocalStep) -> dict[str, torch.Tensor]:
        total = step.handed_on.extra.get("goodness")  # evaluation microbatches only
        return {} if total is None else {"scan": total.argmax(1)}
