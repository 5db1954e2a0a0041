"""Presets: plain functions returning a RunConfig. The command line and config files override them."""

from __future__ import annotations

from dataclasses import replace

from forwardflow.pipeline.config import (
    DataConfig,
    ExecutionConfig,
    OptimConfig,
    RuleConfig,
    RunConfig,
    ScheduleConfig,
)
from forwardflow.pipeline.model import BlockSpec, ModelConfig
from forwardflow.pipeline.rules.ff import ForwardForwardOptions


def fc_model(widths: tuple[int, ...] = (1000, 1000, 1000), name: str = "", dropout: float = 0.0) -> ModelConfig:
    """A fully connected net: flatten, then linear + ReLU + LayerNorm (+ dropout) per hidden layer.

    LayerNorm bounds each layer's output so that the dot-product scores of the local loss stay in
    a range where the softmax does not saturate.
    """
    blocks = [BlockSpec("flatten")]
    for width in widths:
        blocks += [BlockSpec("linear", width), BlockSpec("relu"), BlockSpec("layernorm")]
        if dropout:
            blocks.append(BlockSpec("dropout", p=dropout))
    return ModelConfig(name=name or "fc-" + "x".join(str(w) for w in widths), blocks=tuple(blocks))


def vgg_model(
    channels: tuple[int, ...] = (64, 128, 256, 256, 512, 512),
    fc_width: int = 1024,
    pool_after: tuple[int, ...] = (0, 1, 3, 5),
    name: str = "",
) -> ModelConfig:
    """VGG-style conv blocks (conv 3x3, batch norm, ReLU, max-pool where listed), then one fully
    connected layer."""
    blocks = []
    for index, width in enumerate(channels):
        blocks += [BlockSpec("conv", width, kernel_size=3, padding=1), BlockSpec("batchnorm"), BlockSpec("relu")]
        if index in pool_after:
            blocks.append(BlockSpec("maxpool", kernel_size=2))
    blocks += [BlockSpec("flatten"), BlockSpec("linear", fc_width), BlockSpec("relu"), BlockSpec("layernorm")]
    return ModelConfig(name=name or f"vgg{len(channels) + 1}", blocks=tuple(blocks))


def rnn_model(widths: tuple[int, ...] = (128, 128), cell: str = "gru", name: str = "") -> ModelConfig:
    """A stack of recurrent layers (pipeline/recurrent.py), each followed by a LayerNorm: one stage
    per recurrent layer. The LayerNorm keeps the scale of what a stage hands on (and of Signal
    Propagation's dot-product scores) fixed while the recurrent weights learn."""
    blocks = []
    for width in widths:
        blocks += [BlockSpec(cell, width), BlockSpec("layernorm")]
    return ModelConfig(name=name or f"{cell}-" + "x".join(str(w) for w in widths), blocks=tuple(blocks))


def mnist_fc() -> RunConfig:
    """The default run: MNIST, Signal Propagation, 3 x 1000 fully connected, one stage per layer."""
    return RunConfig(
        data=DataConfig("mnist"),
        model=fc_model(),
        rule=RuleConfig("sigprop"),
        optim=OptimConfig("adam", lr=1e-3, lr_schedule="cosine"),
        schedule=ScheduleConfig(epochs=8, batch_size=512),
    )


def mnist_fc4() -> RunConfig:
    """4 x 1000: splits into 2 stages of nearly equal cost (the throughput benchmark's net)."""
    return replace(mnist_fc(), model=fc_model((1000, 1000, 1000, 1000)))


def fashion_fc() -> RunConfig:
    """Fashion-MNIST needs longer than MNIST: 15 epochs (89.7% against 88.9% after 8)."""
    config = mnist_fc()
    return replace(config, data=DataConfig("fashion-mnist"), schedule=replace(config.schedule, epochs=15))


def cifar_vgg() -> RunConfig:
    """The GPU preset: bfloat16 autocast and channels-last convs (tensor cores; a CPU stage keeps
    bf16 only where the CPU multiplies in bfloat16, and ignores channels-last), copies on a side
    stream. torch.compile stays off: its first minutes of compiling cost more than it saves on a
    short run."""
    return RunConfig(
        data=DataConfig("cifar10", augment=True),
        model=vgg_model(),
        rule=RuleConfig("sigprop"),
        optim=OptimConfig("adam", lr=5e-4),
        schedule=ScheduleConfig(epochs=100, batch_size=128),
        execution=ExecutionConfig(bf16=True, channels_last=True, streams=True),
    )


def cifar_vgg_small() -> RunConfig:
    """A conv net small enough for a 2-core CPU."""
    return RunConfig(
        data=DataConfig("cifar10", augment=True),
        model=vgg_model(channels=(32, 64, 128), fc_width=256, pool_after=(0, 1, 2), name="vgg4-small"),
        rule=RuleConfig("sigprop"),
        optim=OptimConfig("adam", lr=1e-3),
        schedule=ScheduleConfig(epochs=5, batch_size=256),
    )


def synthetic_small() -> RunConfig:
    """Tiny and fast: the tests' and the smoke run's preset."""
    return RunConfig(
        data=DataConfig("synthetic"),
        model=fc_model((32, 32), name="fc-32x32"),
        rule=RuleConfig("sigprop"),
        optim=OptimConfig("adam", lr=2e-3),
        schedule=ScheduleConfig(epochs=3, batch_size=64, eval_batch_size=128),
    )


def mnist_rows() -> RunConfig:
    """Sequential MNIST by rows: 28 time steps of 28 pixels, two GRU layers of 128 (two stages), the
    label as the target of every step (--loss-steps every), scored at the last step."""
    return RunConfig(
        data=DataConfig("mnist", sequence="rows"),
        model=rnn_model(),
        rule=RuleConfig("sigprop"),
        optim=OptimConfig("adam", lr=1e-3),
        schedule=ScheduleConfig(epochs=5, batch_size=128),
    )


def fashion_rows() -> RunConfig:
    config = mnist_rows()
    return replace(config, data=replace(config.data, dataset="fashion-mnist"))


def mnist_pixels() -> RunConfig:
    """Sequential MNIST by pixels: 784 time steps of one pixel (--permute: in a fixed random order).
    A long task: every training batch is 784 microbatches through the pipeline."""
    config = mnist_rows()
    return replace(
        config,
        data=replace(config.data, sequence="pixels"),
        schedule=replace(config.schedule, epochs=2),
    )


def adding() -> RunConfig:
    """The adding problem with T = 100 (--sequence-length): one GRU layer of 128 units, a
    real-valued target, scored by mean squared error (always predicting 1.0 scores 0.167)."""
    return RunConfig(
        data=DataConfig("adding", sequence_length=100),
        model=rnn_model((128,)),
        rule=RuleConfig("sigprop"),
        optim=OptimConfig("adam", lr=1e-3),
        schedule=ScheduleConfig(epochs=10, batch_size=64),
    )


def with_rule(config: RunConfig, rule: str) -> RunConfig:
    """``config`` trained by ``rule``: same data, same net, same epochs and optimizer, plus what the
    rule needs of its own (found on MNIST, fully connected)."""
    if rule == "ff":
        # Forward-Forward learns from many small steps: batch 64 gave 91% label-scan accuracy after
        # one MNIST epoch, 89% with 128. After 3 MNIST epochs (label scan): 96.29% with random
        # negatives and Adam 1e-3; 96.86% with hard negatives; 97.01% with hard negatives and 5e-4
        # (2e-3: 95.57%; batch 32: 96.44%; threshold 0.5 per unit: 96.45%).
        return replace(
            config,
            rule=RuleConfig("ff", ForwardForwardOptions(hard_negatives=True)),
            schedule=replace(config.schedule, batch_size=64),
            optim=replace(config.optim, lr=5e-4),
        )
    return replace(config, rule=RuleConfig(rule))


def mnist_ff() -> RunConfig:
    return with_rule(mnist_fc(), "ff")


def mnist_local() -> RunConfig:
    return with_rule(mnist_fc(), "local")


def mnist_efp() -> RunConfig:
    return with_rule(mnist_fc(), "efp")


def mnist_bp() -> RunConfig:
    return with_rule(mnist_fc(), "bp")


PRESETS = {
    "mnist-fc": mnist_fc,
    "mnist-fc4": mnist_fc4,
    "fashion-fc": fashion_fc,
    "cifar-vgg": cifar_vgg,
    "cifar-vgg-small": cifar_vgg_small,
    "synthetic": synthetic_small,
    "mnist-ff": mnist_ff,
    "mnist-local": mnist_local,
    "mnist-efp": mnist_efp,
    "mnist-bp": mnist_bp,
    "mnist-rows": mnist_rows,
    "mnist-pixels": mnist_pixels,
    "fashion-rows": fashion_rows,
    "adding": adding,
}
DEFAULT_PRESET = "mnist-fc"
