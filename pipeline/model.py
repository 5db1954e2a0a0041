"""Blocks from config, and the split of a model's layers into stages.

A *layer* is a linear or conv block together with the parameter-free and normalisation blocks that
follow it (blocks before the first layer, such as ``flatten``, join the first layer). Stages are
contiguous runs of layers, balanced so that no stage becomes the pipeline's bottleneck by
construction: by the time each layer takes on the target device (``--balance time``, measured by a
short profiling pass, ``pipeline/profiling.py``), or by multiply-accumulates (``--balance macs``).
The split chosen is kept in the config (``model.split``), so a run's summary.json reruns it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass

import torch
from torch import nn

from forwardflow.pipeline.recurrent import RECURRENT_KINDS, build_recurrent, is_recurrent, recurrent_cost
from forwardflow.pipeline.validation import ConfigError, Section, option

BLOCK_KINDS = (
    "linear",
    "conv",
    "batchnorm",
    "layernorm",
    "relu",
    "tanh",
    "gelu",
    "maxpool",
    "avgpool",
    "flatten",
    "dropout",
    *RECURRENT_KINDS,  # pipeline/recurrent.py: one time step of a batch of sequences
)
LAYER_KINDS = ("linear", "conv", *RECURRENT_KINDS)  # blocks that carry weights and start a new layer
BLOCKS = "model.blocks"  # where a bad block is reported: it comes from a preset or a config file


@dataclass(frozen=True)
class BlockSpec(Section):
    """One block of a model: ``width`` is out features (linear, and the state size of a recurrent
    block) or out channels (conv)."""

    kind: str = option(MISSING, "block kind", flag=BLOCKS, choices=BLOCK_KINDS)
    width: int = option(0, "out features or channels", flag=BLOCKS, low=0, high=1 << 16)
    kernel_size: int = option(3, "conv or pooling size", flag=BLOCKS, low=1, high=64)
    padding: int = option(1, "conv zero padding", flag=BLOCKS, low=0, high=64)
    p: float = option(0.0, "dropout probability", flag=BLOCKS, low=0.0, high=0.99)

    def check(self) -> None:
        if self.kind in LAYER_KINDS and self.width < 1:
            raise self.error("width", f"a {self.kind} block needs a width of at least 1")


@dataclass(frozen=True)
class ModelConfig(Section):
    """A network as a list of blocks, split into contiguous stages balanced by compute."""

    name: str = option("model", "the model's name in reports", cli=False)
    blocks: tuple[BlockSpec, ...] = option((), "the blocks, in order", cli=False)
    stages: int = option(
        0,
        "pipeline stages; layers are grouped into contiguous stages of equal cost (--balance) "
        "(0: one per layer, 1 for end-to-end rules)",
        low=0,
        high=1024,
    )
    head: bool = option(True, "a linear output layer trained on the detached last features")
    balance: str = option(
        "time",
        "how layers are grouped into fewer stages than layers: time (a short profiling pass times each "
        "layer's forward and backward on the target device) or macs (multiply-accumulates)",
        choices=("time", "macs"),
    )
    split: tuple[int, ...] = option(
        (),
        "layers per stage, as planned (the builder fills it in; used when it matches the stages and layers)",
        cli=False,
    )

    def check(self) -> None:
        if not self.blocks:
            raise ConfigError(BLOCKS, f"model {self.name} needs at least one block")
        if not any(block.kind in LAYER_KINDS for block in self.blocks):
            raise ConfigError(BLOCKS, f"model {self.name} needs at least one linear or conv block")
        if self.stages > self.num_layers:
            raise self.error(
                "stages",
                f"must be between 1 and {self.num_layers}, the number of layers of model {self.name} "
                f"(got {self.stages})",
            )
        if any(not isinstance(size, int) or isinstance(size, bool) or size < 1 for size in self.split):
            raise ConfigError("model.split", f"must list at least 1 layer per stage (got {list(self.split)})")

    @property
    def num_layers(self) -> int:
        return sum(block.kind in LAYER_KINDS for block in self.blocks)

    @property
    def recurrent(self) -> bool:
        """Whether the model has recurrent blocks (it then learns from sequence data)."""
        return is_recurrent(block.kind for block in self.blocks)


class SeededDropout(nn.Module):
    """Dropout drawing from the stage's own generator.

    The sequential runner and the Ray actors then draw the same masks: a shared global RNG would
    be consumed in a different interleaving by the two executors.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape, device=x.device).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)


def build_block(spec: BlockSpec, in_shape: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
    """One block and the per-sample shape it outputs."""
    kind = spec.kind
    if kind == "linear":
        return nn.Linear(math.prod(in_shape), spec.width), (spec.width,)
    if kind == "flatten":
        return nn.Flatten(), (math.prod(in_shape),)
    if kind in ("relu", "tanh", "gelu"):
        return {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[kind], in_shape
    if kind == "dropout":
        return SeededDropout(spec.p), in_shape
    if kind == "layernorm":
        return nn.LayerNorm(in_shape), in_shape
    if kind in RECURRENT_KINDS:
        if len(in_shape) != 1:
            raise ConfigError(BLOCKS, f"a {kind} block takes one vector per time step; its input is {in_shape}")
        return build_recurrent(kind, spec.width, in_shape[0]), (spec.width,)
    if len(in_shape) != 3:
        raise ConfigError(BLOCKS, f"block {kind} needs image-shaped input (C, H, W), got {in_shape}")
    channels, height, width = in_shape
    if kind == "conv":
        out_h = height + 2 * spec.padding - spec.kernel_size + 1
        out_w = width + 2 * spec.padding - spec.kernel_size + 1
        if out_h < 1 or out_w < 1:
            raise ConfigError(BLOCKS, f"conv kernel {spec.kernel_size} is larger than its input {in_shape}")
        return (nn.Conv2d(channels, spec.width, spec.kernel_size, padding=spec.padding), (spec.width, out_h, out_w))
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels), in_shape
    if kind in ("maxpool", "avgpool"):
        size = spec.kernel_size if spec.kernel_size > 1 else 2
        if height < size or width < size:
            raise ConfigError(BLOCKS, f"{kind} of size {size} does not fit input {in_shape}")
        pool = nn.MaxPool2d(size) if kind == "maxpool" else nn.AvgPool2d(size)
        return pool, (channels, height // size, width // size)
    raise ConfigError(BLOCKS, f"unknown block {kind!r}")


def _layer_cost(spec: BlockSpec, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of a linear or conv block."""
    if spec.kind == "linear":
        return math.prod(in_shape) * spec.width
    if spec.kind in RECURRENT_KINDS:
        return recurrent_cost(spec.kind, in_shape[0], spec.width)
    return in_shape[0] * spec.kernel_size**2 * math.prod(out_shape)


@dataclass(frozen=True)
class StageSpec:
    """Which blocks one stage owns, and the shapes at its boundaries."""

    index: int
    num_stages: int
    blocks: tuple[BlockSpec, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    cost: int  # multiply-accumulates per sample

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def hand_on_bytes(specs: Sequence[StageSpec], batch_size: int, num_classes: int) -> int:
    """An estimate of one microbatch's hand-offs between stages, in bytes: every stage's output but
    the last's, for the inputs and a target per class beside them, in float32. The Ray driver keeps
    each of them until the microbatch's predictions are collected."""
    rows = batch_size + num_classes
    return sum(4 * rows * math.prod(spec.output_shape) for spec in specs[:-1])


def _split_layers(blocks: tuple[BlockSpec, ...]) -> list[list[BlockSpec]]:
    layers: list[list[BlockSpec]] = []
    leading: list[BlockSpec] = []
    for spec in blocks:
        if spec.kind in LAYER_KINDS:
            layers.append(leading + [spec])
            leading = []
        elif layers:
            layers[-1].append(spec)
        else:
            leading.append(spec)
    if not layers:
        raise ConfigError(BLOCKS, "needs at least one linear or conv block")
    return layers


def balanced_split(costs: Sequence[float], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` groups minimising the largest group (exact DP)."""
    n = len(costs)
    prefix: list[float] = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    best: list[list[float]] = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for end in range(k, n + 1):
            for start in range(k - 1, end):
                value = max(best[k - 1][start], prefix[end] - prefix[start])
                if value < best[k][end]:
                    best[k][end], cut[k][end] = value, start
    sizes, end = [], n
    for k in range(parts, 0, -1):
        sizes.append(end - cut[k][end])
        end = cut[k][end]
    return sizes[::-1]


def split_matches(model: ModelConfig, num_stages: int) -> bool:
    """Whether ``model.split`` is a split of this model's layers into ``num_stages`` stages."""
    return len(model.split) == num_stages and sum(model.split) == model.num_layers


def plan_stages(model: ModelConfig, input_shape: tuple[int, ...], num_stages: int) -> list[StageSpec]:
    """The stages: ``model.split`` when it fits, else balanced by multiply-accumulates."""
    layers = _split_layers(model.blocks)
    if not 1 <= num_stages <= len(layers):
        raise ConfigError("--stages", f"must be between 1 and {len(layers)} (got {num_stages})")
    shapes, costs, shape = [input_shape], [], input_shape
    for layer in layers:
        cost = 0
        for spec in layer:
            _, out_shape = build_block(spec, shape)
            if spec.kind in LAYER_KINDS:
                cost += _layer_cost(spec, shape, out_shape)
            shape = out_shape
        shapes.append(shape)
        costs.append(cost)
    sizes = list(model.split) if split_matches(model, num_stages) else balanced_split(costs, num_stages)
    plans, first = [], 0
    for index, size in enumerate(sizes):
        group = layers[first : first + size]
        plans.append(
            StageSpec(
                index=index,
                num_stages=num_stages,
                blocks=tuple(spec for layer in group for spec in layer),
                input_shape=shapes[first],
                output_shape=shapes[first + size],
                cost=sum(costs[first : first + size]),
            )
        )
        first += size
    return plans


def layer_sizes(blocks: tuple[BlockSpec, ...]) -> list[int]:
    """How many of ``blocks`` (a stage's, or a model's) each of their layers spans, in order."""
    return [len(layer) for layer in _split_layers(blocks)]


def layer_blocks(model: ModelConfig) -> list[list[BlockSpec]]:
    """The model's blocks grouped into layers (the units a stage is made of)."""
    return _split_layers(model.blocks)


def build_stage_blocks(spec: StageSpec) -> nn.ModuleList:
    modules, shape = [], spec.input_shape
    for block in spec.blocks:
        module, shape = build_block(block, shape)
        modules.append(module)
    return nn.ModuleList(modules)


def run_blocks(blocks: nn.ModuleList | Sequence[nn.Module], inputs: torch.Tensor, targets: torch.Tensor | None):
    """``h_l = f_l(h_{l-1})`` and ``t_l = f_l(t_{l-1})`` through the very same blocks.

    Inputs and targets go through as one concatenated batch (one matmul, shared normalisation
    statistics). Dropout touches the inputs only: noise on the target path stops learning.

    Where only the targets need a gradient at the stage's input (a learned target layer in front of
    data that needs none), the blocks up to the first weight block run on the two apart and join
    after it: that block's backward then computes the input gradient for the K target rows only,
    not for the whole microbatch (on MNIST's first layer, one of the stage's three large matmuls).
    """
    if targets is None:
        for block in blocks:
            inputs = block(inputs)
        return inputs, None
    rows = inputs.shape[0]
    apart = _blocks_through_first_weights(blocks) if targets.requires_grad and not inputs.requires_grad else 0
    for block in blocks[:apart]:
        inputs, targets = block(inputs), block(targets)
    joint = torch.cat([inputs, targets])
    for block in blocks[apart:]:
        if isinstance(block, SeededDropout):
            joint = torch.cat([block(joint[:rows]), joint[rows:]])
        else:
            joint = block(joint)
    return joint[:rows], joint[rows:]


# Blocks that treat every sample on its own (no statistics across the batch, no state), and of
# those the ones with weights: run_blocks may run them on inputs and targets apart.
WEIGHT_BLOCKS = (nn.Linear, nn.Conv2d)
PER_SAMPLE_BLOCKS = (*WEIGHT_BLOCKS, nn.Flatten)
# Blocks whose output is a function of their input and weights alone (no running statistics, no
# random draws, no state): run again in the backward pass, they give the very same values.
RECOMPUTABLE_KINDS = ("relu", "tanh", "gelu", "layernorm", "maxpool", "avgpool", "flatten")
# Blocks that keep their own output for their backward pass: recomputing them saves nothing.
KEEPS_ITS_OUTPUT = ("relu", "tanh")


def recomputable_tail(blocks: Sequence[BlockSpec]) -> int:
    """Where the blocks worth running again in the backward pass start (``len(blocks)``: none):
    the run of recomputable blocks that ends ``blocks``, less any leading block that keeps its
    output anyway (a ReLU after a linear layer: its output is what the tail would keep)."""
    start = len(blocks)
    while start and blocks[start - 1].kind in RECOMPUTABLE_KINDS:
        start -= 1
    while start < len(blocks) and blocks[start].kind in KEEPS_ITS_OUTPUT:
        start += 1
    return start


def _blocks_through_first_weights(blocks: nn.ModuleList | Sequence[nn.Module]) -> int:
    """How many leading blocks, up to and including the first weight block, treat every sample
    on its own (0 when another kind of block comes first)."""
    for count, block in enumerate(blocks, 1):
        module = getattr(block, "_orig_mod", block)  # a compiled block's own module
        if not isinstance(module, PER_SAMPLE_BLOCKS):
            return 0
        if isinstance(module, WEIGHT_BLOCKS):
            return count
    return 0
