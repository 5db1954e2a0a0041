"""What the scaling model (benchmarks/scaling.py) is built from, each measured on this machine:
every stage's compute (in one process, and in one Ray actor per stage all stepping at once), the
host costs of the real Ray pipeline, and the cost of a byte handed from actor to actor."""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import torch

from benchmarks.overhead import tiny_config
from forwardflow.launch.build import build_run
from forwardflow.pipeline.config import RunConfig
from forwardflow.pipeline.messages import TRAIN, Microbatch, Prediction
from forwardflow.pipeline.stage import Stage
from forwardflow.pipeline.training import Progress, RunObserver


@dataclass
class StageCosts:
    compute_s: list[float]  # per stage, per training microbatch
    in_bytes: list[int]  # the microbatch each stage receives
    out_bytes: list[int]  # and hands on (the last stage: its prediction, small)
    input_shape: tuple[int, ...] = ()  # of one sample
    first_inputs: list[Microbatch] = field(default_factory=list)  # each stage's first input


def nbytes(mb: Microbatch) -> int:
    tensors = [mb.inputs, mb.labels, mb.targets, mb.context, *mb.extra.values()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def stage_costs(config: RunConfig, steps: int, warmup: int = 5) -> StageCosts:
    """Each stage's compute time per training microbatch, timed around Stage.step in this process
    (one torch thread), and the sizes of what it receives and hands on."""
    torch.set_num_threads(1)
    run = build_run(config)
    device = config.execution.device if config.execution.device != "auto" else "cpu"
    stages = [Stage(setup, device) for setup in run.setups]
    times: list[list[float]] = [[] for _ in stages]
    in_bytes, out_bytes = [0] * len(stages), [0] * len(stages)
    first_inputs: list[Microbatch] = []
    for count, first in enumerate(run.schedule.microbatches()):
        if count >= warmup + steps:
            break
        mb = first
        for index, stage in enumerate(stages):
            in_bytes[index] = nbytes(mb)
            if count == 0:
                first_inputs.append(mb)
            started = time.perf_counter()
            result = stage.step(mb)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if count >= warmup:
                times[index].append(time.perf_counter() - started)
            if isinstance(result, Microbatch):
                mb = result.to("cpu")
                out_bytes[index] = nbytes(mb)
            else:
                out_bytes[index] = result.labels.numel() * 8
                break
    medians = [statistics.median(t) for t in times]
    return StageCosts(medians, in_bytes, out_bytes, run.dataset.input_shape, first_inputs)


# ---------------------------------------------------------------- hop costs


@ray.remote(num_cpus=0)
class Relay:
    """Hands a microbatch on unchanged: all it costs is Ray's (receive, deserialize, serialize)."""

    def step(self, mb: Microbatch) -> Microbatch:
        return mb

    def cpu_s(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


def raylet_cpu_s() -> float:
    """CPU seconds of this cluster's raylets (on this machine), from /proc."""
    gcs = ray.get_runtime_context().gcs_address.encode()
    total = 0.0
    for entry in Path("/proc").iterdir():
        try:
            raylet = entry.name.isdigit() and (entry / "comm").read_text().strip() == "raylet"
            if raylet and gcs in (entry / "cmdline").read_bytes():
                total += process_cpu_s(int(entry.name))
        except OSError:
            pass
    return total


@dataclass
class HopCost:
    actor_s: float  # CPU per microbatch in a relay's process
    driver_s: float  # CPU per microbatch in the driver (for a chain of `relays`)
    raylet_s: float  # CPU per microbatch in the raylets
    relays: int


def measure_hop(mb: Microbatch, relays: int, microbatches: int, nodes: list[str] | None = None) -> HopCost:
    """A chain of ``relays`` actors (pinned to ``nodes`` in turn, when given) passing ``mb``,
    window 8 as the pipeline: CPU time per microbatch of the relays, the driver and the raylets."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actors = []
    for index in range(relays):
        options = {}
        if nodes:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=False)
        actors.append(Relay.options(**options).remote())  # type: ignore[attr-defined]
    ray.get([actor.cpu_s.remote() for actor in actors])
    for _ in range(10):  # warm-up
        ref = ray.put(mb)
        for actor in actors:
            ref = actor.step.remote(ref)
        ray.get(ref)
    actor_start = ray.get([actor.cpu_s.remote() for actor in actors])
    raylet_start, driver_start = raylet_cpu_s(), time.process_time()
    in_flight: list = []
    for _ in range(microbatches):
        ref = ray.put(mb)
        for actor in actors:
            ref = actor.step.remote(ref)
        in_flight.append(ref)
        if len(in_flight) >= 8:
            ray.get(in_flight.pop(0))
    ray.get(in_flight)
    driver = time.process_time() - driver_start
    raylet = raylet_cpu_s() - raylet_start
    actor = [end - start for end, start in zip(ray.get([a.cpu_s.remote() for a in actors]), actor_start)]
    for a in actors:
        ray.kill(a)
    return HopCost(statistics.mean(actor) / microbatches, driver / microbatches, raylet / microbatches, relays)


class HostMeter(RunObserver):
    """CPU seconds of the driver, each stage's actor and the whole machine between the ``first``-th
    and the ``last``-th training prediction of a Ray run (the steady state), from /proc."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.trained = first, last, 0
        self.pids: list[int] = []
        self.readings: list[tuple[float, list[float], float]] = []

    def on_prediction(self, prediction: Prediction, progress: Progress) -> None:
        if prediction.phase != TRAIN:
            return
        self.trained += 1
        if self.trained in (self.first, self.last):
            actors = [process_cpu_s(pid) for pid in self.pids]
            self.readings.append((time.process_time(), actors, machine_cpu_s()))

    def per_microbatch(self) -> tuple[float, list[float], float]:
        (driver0, actors0, machine0), (driver1, actors1, machine1) = self.readings
        n = self.last - self.first
        return (driver1 - driver0) / n, [(b - a) / n for a, b in zip(actors0, actors1)], (machine1 - machine0) / n


def machine_cpu_s() -> float:
    """CPU seconds this machine has been busy (every process and the kernel), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class HostCost:
    actor_s: float  # per stage and training microbatch, beyond Stage.step
    driver_s: float
    rest_s: float  # the rest of the machine's CPU: raylet, Ray's other processes, the kernel


def measure_host(stages: int, epochs: int) -> HostCost:
    """The real Ray pipeline with ``stages`` stages of the tiny net (one local node): CPU per
    training microbatch of the driver, the actors (less their own Stage.step) and the raylet. At
    --window 8, the fewest microbatches per call a default run sends (2 at 2 stages, 1 at 4): an
    upper bound for the runs measured, whose window holds more of their hand-offs."""
    config = tiny_config(stages, "ray", epochs, window=8)
    in_process = replace(config, execution=replace(config.execution, executor="sequential", window=None))
    compute = sum(stage_costs(in_process, 40).compute_s)
    meter = HostMeter(first=16, last=16 * epochs - 8)  # after the first epoch, before the last microbatches
    with build_run(config, [meter]) as run:
        meter.pids = [int(location["pid"]) for location in run.executor.locations]  # type: ignore[attr-defined]
        run.train()
    driver, actors, machine = meter.per_microbatch()
    return HostCost(max(0.0, (sum(actors) - compute) / stages), driver, max(0.0, machine - driver - sum(actors)))


def sized_microbatch(size_bytes: int) -> Microbatch:
    rows = 512
    width = max(1, size_bytes // (rows * 4))
    return Microbatch(0, "train", 0, torch.randn(rows, width), torch.zeros(rows, dtype=torch.long))


@ray.remote(num_cpus=0)
class StageTimer:
    """One stage in its own Ray actor, stepping on one input microbatch over and over."""

    def __init__(self, setup, mb: Microbatch):
        torch.set_num_threads(1)
        self.stage, self.mb = Stage(setup, torch.device("cpu")), mb

    def cpu_per_step(self, steps: int, warmup: int = 5) -> float:
        seconds = []
        for index in range(warmup + steps):
            mb = replace(self.mb, index=index)  # a stage takes microbatches in stream order only
            started = time.thread_time()
            self.stage.step(mb)
            if index >= warmup:
                seconds.append(time.thread_time() - started)
        return statistics.median(seconds)


def concurrent_compute(config: RunConfig, inputs: list[Microbatch], steps: int) -> list[float]:
    """Each stage's CPU time per training microbatch (thread time around Stage.step) with every
    stage in its own actor and all of them stepping at once on its input (``inputs``, from
    StageCosts.first_inputs), as in the Ray pipeline: stages that share the cores slow each other
    (caches, memory bandwidth, Ray's threads in each process), which a stage timed alone in one
    process does not show. The benchmark runs it in a fresh process, where it starts (and stops) a
    local Ray; where Ray is up already, it uses that one and leaves it running."""
    from forwardflow.actors.cluster import connect

    run = build_run(config)
    own_ray = not ray.is_initialized()
    if own_ray:
        connect(None)
    timers = [StageTimer.remote(setup, given) for setup, given in zip(run.setups, inputs)]  # type: ignore[attr-defined]
    try:
        return ray.get([timer.cpu_per_step.remote(steps) for timer in timers])
    finally:
        for timer in timers:
            ray.kill(timer)
        if own_ray:
            ray.shutdown()
