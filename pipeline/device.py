"""Devices, the few deliberate host reads of device values, and step timing that does not wait.

A stage's step never waits for its device: values the host needs (losses, hit counts, the
non-finite flag) accumulate in device tensors and are read at a few places only, each inside
:func:`host_read`. Those reads are the run's sanctioned sync points; ``benchmarks/device_check.py``
runs the steady state under ``torch.cuda.set_sync_debug_mode("error")``, which ``host_read``
lifts for its own block only, so any other synchronisation fails loudly there.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from forwardflow.pipeline.messages import Microbatch, Prediction, StageStats

# The device (and its tensors' name) each transport named by --transport carries between stages
# (actors/transport.py); auto and object-store carry any.
TRANSPORT_DEVICES = {
    "gloo": ("cpu", "CPU tensors"),
    "nccl": ("cuda", "GPU tensors"),
    "cuda-ipc": ("cuda", "GPU tensors"),
}


# CPU flags (Linux's /proc/cpuinfo) of instructions that multiply in bfloat16: x86's AVX512-BF16 and
# AMX, Arm's BF16. Without them oneDNN emulates bfloat16 matmuls, slower than float32 ones.
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def bfloat16_in_cpu_flags(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text lists an instruction set that computes in bfloat16."""
    flags = {
        flag
        for line in cpuinfo.splitlines()
        if line.startswith(("flags", "Features"))  # x86, Arm
        for flag in line.partition(":")[2].split()
    }
    return bool(flags & BFLOAT16_CPU_FLAGS)


@functools.cache
def cpu_computes_bfloat16() -> bool:
    """Whether this machine's CPU multiplies in bfloat16 natively (False where that can't be read)."""
    try:
        return bfloat16_in_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def uses_bfloat16(device: torch.device, asked: bool) -> bool:
    """Whether a stage on ``device`` computes in bfloat16 when ``--bf16`` is ``asked``: on a GPU,
    and on a CPU that multiplies in bfloat16."""
    return asked and (device.type == "cuda" or cpu_computes_bfloat16())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def host_read() -> Iterator[None]:
    """Marks a deliberate read of device values on the host (a sync point on a GPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class StepClock:
    """Compute time of a stage's steps, without waiting for the device.

    On the CPU a step's work is done when ``step`` returns: the host clock measures it. On a GPU
    the host only queues kernels, so the clock records a CUDA event before and after each step
    on the stage's stream and adds up the elapsed device time later, for the pairs the device has
    finished (``Event.query`` does not wait), and for all of them once the caller has synchronised
    (``collect(finished=True)``, at a snapshot).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] = []

    def start(self) -> tuple[float, torch.cuda.Event | None]:
        if not self.cuda:
            return time.perf_counter(), None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return time.perf_counter(), event

    def stop(self, started: tuple[float, torch.cuda.Event | None], training: bool, stats: StageStats) -> float:
        """Ends a step; returns its host time (the whole step on a CPU, the queueing on a GPU)."""
        host_s = time.perf_counter() - started[0]
        if started[1] is None:
            stats.busy_s += host_s
            if training:
                stats.count_step(host_s)
            return host_s
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((started[1], end, training))
        return host_s

    def collect(self, stats: StageStats, finished: bool = False) -> None:
        """Adds the device time of finished steps to ``stats`` (all of them if ``finished``: the
        caller has synchronised the device)."""
        kept = []
        for begin, end, training in self._pending:
            if not finished and not end.query():
                kept.append((begin, end, training))
                continue
            seconds = begin.elapsed_time(end) / 1000
            stats.busy_s += seconds
            if training:
                stats.count_step(seconds)
        self._pending = kept


class CopyStream:
    """A side CUDA stream for copies between host and GPU (``--streams``): the copy of one
    microbatch runs while the compute stream works on another, instead of queueing behind it.

    Ordering stays explicit: the compute stream waits on an event recorded after a microbatch's
    copy before it reads it (``use``), and the copy stream waits on the compute stream before it
    copies a result out (``to_host``); ``record_stream`` keeps the caching allocator from reusing
    memory that the other stream may still touch. ``finish`` waits on the host for the copies out:
    once per Ray call, not per microbatch.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_device(self, message: Microbatch) -> tuple[Microbatch, torch.cuda.Event]:
        """Queue the copy of ``message`` to the GPU; pass the result to ``use`` before computing on it."""
        pinned = message.map(lambda tensor: tensor if tensor.is_pinned() else tensor.pin_memory())
        with torch.cuda.stream(self.stream):
            moved = pinned.map(lambda tensor: tensor.to(self.device, non_blocking=True))
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return moved, copied

    def use(self, message: Microbatch, copied: torch.cuda.Event) -> Microbatch:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)

        def owned(tensor: torch.Tensor) -> torch.Tensor:
            tensor.record_stream(compute)
            return tensor

        return message.map(owned)

    def to_host(self, result: Microbatch | Prediction) -> Microbatch | Prediction:
        """Queue the copy of ``result`` into pinned host memory, after what the compute stream has
        queued so far; the values are there once ``finish`` returns."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

        def out(tensor: torch.Tensor) -> torch.Tensor:
            tensor.record_stream(self.stream)
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            return host.copy_(tensor, non_blocking=True)

        with torch.cuda.stream(self.stream):
            return result.map(out)

    def finish(self) -> None:
        self.stream.synchronize()
