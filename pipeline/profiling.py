"""A short profiling pass: how long each layer takes on the device it will run on, so that
``--stages N`` can group layers into stages of equal time rather than equal multiply-accumulates
(which miss memory-bound blocks such as normalisation and pooling, and a GPU's launch cost per
kernel, which makes small layers cost about the same as large ones).

Each layer (its linear or conv block and the blocks that follow it) runs forward and backward on a
microbatch of random inputs of the run's size, once to warm up and then ``repeats`` times; the
median counts. It runs in the driver's process, before any stage is built, with the stage's
number of torch threads; the split it gives is written into the run's config (``model.split``).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from forwardflow.pipeline.model import ModelConfig, balanced_split, build_block, layer_blocks


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # setup, not the training loop: waiting is the point here


def time_layers(
    model: ModelConfig,
    input_shape: tuple[int, ...],
    batch_size: int,
    device: str | torch.device,
    repeats: int = 3,
    threads: int = 1,
) -> list[float]:
    """Seconds of one forward and backward pass of each layer on ``device``, in layer order."""
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            seconds, shape = [], input_shape
            x = torch.randn(batch_size, *input_shape, device=device)
            for layer in layer_blocks(model):
                modules = []
                for spec in layer:
                    module, shape = build_block(spec, shape)
                    modules.append(module)
                net = nn.Sequential(*modules).to(device).train()
                runs = []
                for _ in range(repeats + 1):
                    _wait(device)
                    started = time.perf_counter()
                    y = net(x)
                    y.float().pow(2).mean().backward()
                    _wait(device)
                    runs.append(time.perf_counter() - started)
                seconds.append(statistics.median(runs[1:]))
                x = y.detach()
    finally:
        torch.set_num_threads(previous_threads)
    return seconds


def measured_split(
    model: ModelConfig,
    input_shape: tuple[int, ...],
    num_stages: int,
    batch_size: int,
    device: str | torch.device,
    threads: int = 1,
) -> tuple[int, ...]:
    """Layers per stage, balanced by the time each layer takes on ``device``."""
    seconds = time_layers(model, input_shape, batch_size, device, threads=threads)
    return tuple(balanced_split(seconds, num_stages))
