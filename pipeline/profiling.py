"""A short profiling pass: how long each layer takes on the device it will run on, so that
``--stages N`` can group layers into stages of equal time rather than equal multiply-accumulates
(which miss memory-bound blocks such as normalisation and pooling, and a GPU's launch cost per
kernel, which makes small layers cost about the same as large ones).

Each layer (its linear or conv block and the blocks that follow it) runs forward and backward on a
microbatch of random inputs of the run's size, once to warm up and then in ``repeats`` rounds over
all layers; the fastest round counts. It runs in the driver's process, before any stage is built,
with the stages' number of torch threads; the split chosen is written into the run's config
(``model.split``), so a rerun does not depend on a new measurement.

``SavedActivations`` measures a step's activation memory instead: the bytes autograd keeps for the
backward pass, live and at their peak (the peer benchmark and the tests use it).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from forwardflow.pipeline.model import (
    LAYER_KINDS,
    ModelConfig,
    balanced_split,
    build_block,
    layer_blocks,
    plan_stages,
)

MIN_GAIN = 0.1  # how much faster the slowest stage must get for the timed split to replace the MACs one


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # setup, not the training loop: waiting is the point here


def time_layers(
    model: ModelConfig,
    input_shape: tuple[int, ...],
    batch_size: int,
    device: str | torch.device,
    repeats: int = 5,
    threads: int = 1,
) -> list[float]:
    """Seconds of one forward and backward pass of each layer on ``device``, in layer order: the
    fastest of ``repeats`` rounds over all layers (other work on the machine only ever adds time,
    and interleaving spreads a burst of it over the layers)."""
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            layers, shape = [], input_shape
            x = torch.randn(batch_size, *input_shape, device=device)
            for blocks in layer_blocks(model):
                modules = []
                for spec in blocks:
                    module, shape = build_block(spec, shape)
                    modules.append(module)
                net = nn.Sequential(*modules).to(device).train()
                layers.append((net, x))
                x = _pass(net, x, device)[1]  # also the warm-up of this layer
            runs: list[list[float]] = [[] for _ in layers]
            for _ in range(repeats):
                for times, (net, x) in zip(runs, layers):
                    times.append(_pass(net, x, device)[0])
    finally:
        torch.set_num_threads(previous_threads)
    return [min(times) for times in runs]


def _pass(net: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor]:
    _wait(device)
    started = time.perf_counter()
    y = net(x)
    y.float().pow(2).mean().backward()
    _wait(device)
    return time.perf_counter() - started, y.detach()


def _slowest(sizes: list[int], seconds: list[float]) -> float:
    """The slowest stage's time when the layers are grouped by ``sizes``."""
    slowest, first = 0.0, 0
    for size in sizes:
        slowest = max(slowest, sum(seconds[first : first + size]))
        first += size
    return slowest


def measured_split(
    model: ModelConfig,
    input_shape: tuple[int, ...],
    num_stages: int,
    batch_size: int,
    device: str | torch.device,
    threads: int = 1,
) -> tuple[int, ...]:
    """Layers per stage, balanced by the time each layer takes on ``device``. The split by
    multiply-accumulates stands unless the timed one makes the slowest stage at least
    ``MIN_GAIN`` faster (by the same measurements): timing noise alone never moves a layer."""
    seconds = time_layers(model, input_shape, batch_size, device, threads=threads)
    timed = balanced_split(seconds, num_stages)
    by_macs = [
        sum(spec.kind in LAYER_KINDS for spec in stage.blocks)
        for stage in plan_stages(replace(model, split=()), input_shape, num_stages)
    ]
    if _slowest(timed, seconds) <= (1 - MIN_GAIN) * _slowest(by_macs, seconds):
        return tuple(timed)
    return tuple(by_macs)


class SavedActivations:
    """Live bytes of the tensors autograd saves for backward (each storage counted once), and their
    peak. Parameters are left out: they are the weights, not activations."""

    def __init__(self, parameters: list[torch.Tensor]):
        self.excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self.live: dict[int, list[int]] = {}  # storage -> [references, bytes]
        self.bytes = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or key == 0:
            return tensor
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        return _Held(tensor, key, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    def __init__(self, tensor: torch.Tensor, key: int, owner: SavedActivations):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner.release(self.key)
