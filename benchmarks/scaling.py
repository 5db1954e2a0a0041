"""A scaling model for the Ray pipeline: throughput for 1..N devices and nodes predicted from each
stage's measured compute time and the measured cost of a hop, checked against every configuration
this machine can run.

    python -m benchmarks.scaling            # writes benchmarks/results/scaling.md
    python -m benchmarks.scaling --quick    # small budgets: checks that it runs (figures rough)

The model. A training microbatch of B samples goes through S stages. Stage s computes for c_s
seconds (measured: Stage.step in this process, one torch thread, after a warm-up, for the
sequential runner; for the pipeline, CPU time per Stage.step with every stage in its own Ray actor
and all stepping at once, since stages that share the cores slow each other), and its actor
spends a(bytes) = a0 + k * bytes more on the microbatch's way in and out. The driver spends d(S)
per microbatch (plans, S calls, the prediction) and the raylets r(S). a0, d and r are measured on
the real Ray pipeline (LayerActor, driver loop, grouped calls) training a net whose compute is
negligible (``--preset synthetic``'s 32-unit layers), as CPU seconds per training microbatch read
from /proc between two points of the run: the actors', the driver's, and r, the rest of the
machine's (the raylet, Ray's other processes, the kernel); k, the cost of a byte, comes from a
chain of Ray actors that hand on microbatches of 64 KiB and 4 MiB unchanged. A stage's actor is busy
o_s = c_s + a_s per microbatch, and the pipeline's period is the largest of

    max_s o_s                          each stage on a device of its own: the slowest stage
    sum of o_s over a device's stages  stages sharing a device
    (sum_s o_s + d + r) / cores        everything that runs on a node's cores (CPU stages and
                                       every stage's host part: a GPU stage's a_s, d and r)
    bytes across a node boundary / bandwidth

and the throughput B / period. Every configuration that can be measured here is run for real
(launch/train.py in a fresh process, 2 cores and a two-node cluster on loopback here), and the
table shows predicted beside measured (the steady state: the rate of a run's second epoch). The
last table predicts 1..8 devices of the kind measured (this machine's cores, or GPUs with
``--device cuda`` on a GPU machine) for a deeper net, one stage per device, on 1, 2 and 4 nodes; it
is a prediction, labelled as one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from benchmarks.common import load_line, machine, today, write_report
from benchmarks.scaling_inputs import (
    HostCost,
    StageCosts,
    concurrent_compute,
    measure_hop,
    measure_host,
    sized_microbatch,
    stage_costs,
)
from forwardflow.launch.cli import parse_config
from forwardflow.launch.local_cluster import local_cluster
from forwardflow.pipeline.config import RunConfig
from forwardflow.pipeline.model import LAYER_KINDS, plan_stages
from forwardflow.pipeline.presets import fc_model

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class HopModel:
    """a(bytes) = base + per_byte * bytes for a relay; the driver's d = driver_base + driver_per_stage * S."""

    base: float
    per_byte: float
    driver_base: float
    driver_per_stage: float
    raylet_per_stage: float
    raylet_per_byte: float = 0.0  # per byte a stage receives
    cross_node_per_byte: float = 0.0  # extra CPU per byte of a hop between nodes (both raylets)

    def actor(self, size: int) -> float:
        return self.base + self.per_byte * size


def fit_hop_model(host: dict[int, HostCost], microbatches: int, sizes: tuple[int, int], nodes: list[str]) -> HopModel:
    """a0, d(S) = d0 + d1 * S and r(S) = r1 * S from the real pipeline at two stage counts (``host``);
    the cost of a byte, in an actor and in the raylets, from relays at two sizes."""
    small, large = (measure_hop(sized_microbatch(size), 2, microbatches, nodes) for size in sizes)
    per_byte = max(0.0, (large.actor_s - small.actor_s) / (sizes[1] - sizes[0]))
    raylet_per_byte = max(0.0, (large.raylet_s - small.raylet_s) / (sizes[1] - sizes[0]) / 2)
    (s0, low), (s1, high) = sorted(host.items())
    driver_per_stage = max(0.0, (high.driver_s - low.driver_s) / (s1 - s0))
    return HopModel(
        base=statistics.mean(cost.actor_s for cost in host.values()),
        per_byte=per_byte,
        driver_base=max(0.0, low.driver_s - driver_per_stage * s0),
        driver_per_stage=driver_per_stage,
        raylet_per_stage=statistics.mean(cost.rest_s / s for s, cost in host.items()),
        raylet_per_byte=raylet_per_byte,
    )


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Layout:
    """S stages; stage s on device devices[s] of node nodes[s]; cores per node for host work."""

    devices: tuple[int, ...]
    nodes: tuple[int, ...]
    cores_per_node: float
    gpu: bool = False
    bandwidth_bytes_s: float = 1.25e9  # 10 Gb/s between nodes
    one_machine: bool = False  # nodes that share one machine's cores (a local cluster)


def predict(costs: StageCosts, hop: HopModel, layout: Layout, batch: int) -> float:
    """Samples per second of the Ray pipeline (see the module's docstring)."""
    stages = len(costs.compute_s)
    host = [(hop.actor(costs.in_bytes[s]) + hop.actor(costs.out_bytes[s])) / 2 for s in range(stages)]
    busy = [costs.compute_s[s] + host[s] for s in range(stages)]
    driver = hop.driver_base + hop.driver_per_stage * stages
    period = max(*busy, driver)
    for device in set(layout.devices):
        period = max(period, sum(busy[s] for s in range(stages) if layout.devices[s] == device))
    # The cores of each machine: a node's, or one pool for nodes that share a machine.
    machine_of = [0] * stages if layout.one_machine else list(layout.nodes)
    for host_machine in set(machine_of):
        mine = [s for s in range(stages) if machine_of[s] == host_machine]
        cpu = sum(host[s] if layout.gpu else busy[s] for s in mine) + hop.raylet_per_stage * len(mine)
        cpu += hop.raylet_per_byte * sum(costs.in_bytes[s] for s in mine)
        # A hop between nodes costs both raylets a copy (counted once per side).
        for s in range(1, stages):
            if layout.nodes[s] != layout.nodes[s - 1]:
                sides = (machine_of[s - 1] == host_machine) + (machine_of[s] == host_machine)
                cpu += sides / 2 * hop.cross_node_per_byte * costs.in_bytes[s]
        if host_machine == machine_of[0]:
            cpu += driver
        period = max(period, cpu / layout.cores_per_node)
    for s in range(1, stages):
        if layout.nodes[s] != layout.nodes[s - 1]:
            period = max(period, costs.in_bytes[s] / layout.bandwidth_bytes_s)
    return batch / period


# ---------------------------------------------------------------- measured runs


def measured(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Training samples/s of launch/train.py (in a fresh process) in its last epoch: the steady
    state, which the model predicts (the first epoch pays for starting the actors, warming up each
    stage and filling the pipeline; the last one includes its evaluation pass)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "launch/train.py", "--no-progress", *argv, "--out", out]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
        before, last = json.loads((Path(out) / "summary.json").read_text())["evaluations"][-2:]
        return (last["train_samples_seen"] - before["train_samples_seen"]) / (last["wall_s"] - before["wall_s"])


def blocks(stages: int, nodes: int) -> tuple[int, ...]:
    """Contiguous balanced blocks, as --placement spread lays them out."""
    return tuple(s * nodes // stages for s in range(stages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", default="mnist-fc4")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--train-limit", type=int, default=60000)
    parser.add_argument("--steps", type=int, default=40, help="timed microbatches per stage cost")
    parser.add_argument("--device", default="cpu", help="the device of the stage costs (cuda on a GPU machine)")
    parser.add_argument("--quick", action="store_true", help="small budgets")
    parser.add_argument("--out", default=str(RESULTS / "scaling.md"))
    args = parser.parse_args()
    if args.quick:
        args.train_limit, args.steps = 6000, 10
    common = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--test-limit", "500"]
    common += ["--train-limit", str(args.train_limit), "--epochs", "2", "--device", "cpu"]
    base = parse_config(common)
    layers = base.model.num_layers
    costs = {s: stage_costs(replace_stages(base, s), args.steps) for s in range(1, layers + 1)}
    for s, c in costs.items():
        print(f"costs, {s} stage(s): compute {[f'{1e3 * t:.2f} ms' for t in c.compute_s]}, in bytes {c.in_bytes}")

    cores = float(os.cpu_count() or 1)
    seq = ["--executor", "sequential", "--threads", "1"]
    single = {s: measured(common + seq + ["--stages", str(s)]) for s in sorted({1, 2, layers})}
    pipelined = {s: measured(common + ["--stages", str(s)]) for s in range(2, layers + 1)}
    microbatches = 100 if args.quick else 400
    # Host costs of the real pipeline at two stage counts, each in a fresh process with the local
    # Ray its builder starts (as launch/train.py runs), so that no Ray outlives its run here.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        host = {s: pool.submit(measure_host, s, 6 if args.quick else 20).result() for s in (2, 4)}
        # The pipeline's stages share the cores: their compute measured in actors stepping at once.
        together = {
            s: replace(
                costs[s],
                compute_s=pool.submit(
                    concurrent_compute, replace_stages(base, s), costs[s].first_inputs, args.steps
                ).result(),
            )
            for s in range(2, layers + 1)
        }
    for s, c in together.items():
        print(f"compute in {s} actors at once: {[f'{1e3 * t:.2f} ms' for t in c.compute_s]}")
    with local_cluster(nodes=2, cpus=1) as cluster:
        # Per-byte costs on the local two-node cluster: relays on the head, then on both nodes in turn.
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        head = cluster.nodes[:1]
        hop = fit_hop_model(host, microbatches, (64 * 1024, 4 * 2**20), head)
        across = measure_hop(sized_microbatch(4 * 2**20), 2, microbatches, nodes=cluster.nodes)
        same = measure_hop(sized_microbatch(4 * 2**20), 2, microbatches, nodes=head)
        ray.shutdown()
        hop = replace(hop, cross_node_per_byte=max(0.0, (across.raylet_s - same.raylet_s) / (4 * 2**20)))
        spread = {
            s: measured(
                common + ["--stages", str(s), "--address", cluster.address, "--placement", "spread"], cluster.env
            )
            for s in (2, layers)
        }
    print("hop model", hop)
    rows = []  # (configuration, predicted, measured)
    for s, got in single.items():
        rows.append((f"sequential, {s} stage(s), 1 thread", args.batch_size / sum(costs[s].compute_s), got))
    for s, got in pipelined.items():
        layout = Layout(devices=tuple(range(s)), nodes=(0,) * s, cores_per_node=cores)
        predicted = predict(together[s], hop, layout, args.batch_size)
        rows.append((f"ray, {s} stages, 1 node, {cores:g} cores", predicted, got))
    for s, got in spread.items():
        # The two nodes share this machine's cores (one pool), plus the copies between them.
        layout = Layout(
            devices=tuple(range(s)),
            nodes=blocks(s, 2),
            cores_per_node=cores,
            bandwidth_bytes_s=math.inf,
            one_machine=True,
        )
        name = f"ray, {s} stages spread over 2 local nodes (same {cores:g} cores)"
        rows.append((name, predict(together[s], hop, layout, args.batch_size), got))
    for name, predicted, got in rows:
        print(
            f"{name}: predicted {predicted:,.0f}, measured {got:,.0f} samples/s ({100 * (predicted / got - 1):+.0f}%)"
        )
    table = predicted_table(base, hop, args)
    write_results(Path(args.out), args, costs, together, hop, rows, table)


def replace_stages(config: RunConfig, stages: int) -> RunConfig:
    return replace(config, model=replace(config.model, stages=stages))


def predicted_table(base: RunConfig, hop: HopModel, args) -> dict[tuple[int, int], float]:
    """1..8 devices, one stage each, of an 8 x 1000 net, on 1, 2 and 4 nodes (10 Gb/s between
    them), each node with a host core per device plus two. Each layer's cost is measured once (8
    stages of one layer); a stage of several layers costs the sum of its layers, so that the
    predictions of different splits rest on the same measurements."""
    deep = replace(base, model=fc_model((1000,) * 8, name="fc-8x1000"))
    deep = replace(deep, execution=replace(deep.execution, device=args.device))
    layers = stage_costs(replace_stages(deep, 8), args.steps)
    print(f"8 x 1000, per layer: {[f'{1e3 * t:.2f} ms' for t in layers.compute_s]}")
    table = {}
    for devices in range(1, 9):
        specs = plan_stages(deep.model, layers.input_shape, devices)
        sizes = [sum(block.kind in LAYER_KINDS for block in spec.blocks) for spec in specs]
        starts = [sum(sizes[:i]) for i in range(devices)]
        costs = StageCosts(
            compute_s=[sum(layers.compute_s[a : a + n]) for a, n in zip(starts, sizes)],
            in_bytes=[layers.in_bytes[a] for a in starts],
            out_bytes=[layers.out_bytes[a + n - 1] for a, n in zip(starts, sizes)],
        )
        for nodes in (1, 2, 4):
            if nodes > devices:
                continue
            layout = Layout(
                devices=tuple(range(devices)),
                nodes=blocks(devices, nodes),
                cores_per_node=math.ceil(devices / nodes) + 2,
                gpu=args.device.startswith("cuda"),
            )
            table[devices, nodes] = predict(costs, hop, layout, args.batch_size)
    return table


def write_results(path: Path, args, costs, together, hop: HopModel, rows, table) -> None:
    lines = [
        f"# Scaling model ({today()}, {machine()})",
        "",
        f"Command: `python -m benchmarks.scaling{' --quick' if args.quick else ''}`. Net: `--preset {args.preset}`, "
        f"microbatch {args.batch_size}, rule sigprop, one torch thread per stage; measured: samples/s in the second "
        f"of 2 epochs of {args.train_limit} MNIST samples (the steady state, which the model predicts). "
        "The model is in the docstring of benchmarks/scaling.py.",
        "",
        "Measured inputs: compute per stage and microbatch (ms), for each stage count, in one process (for the "
        "sequential runner) and in one actor per stage, all stepping at once (CPU time, for the Ray pipeline):",
        "",
    ]
    for s, c in costs.items():
        alone = ", ".join(f"{1e3 * t:.2f}" for t in c.compute_s)
        at_once = (
            f"; in actors at once: {', '.join(f'{1e3 * t:.2f}' for t in together[s].compute_s)}"
            if s in together
            else ""
        )
        lines.append(f"- {s} stage(s): {alone}{at_once}")
    lines += [
        "",
        f"Host costs per training microbatch: {1e6 * hop.base:.0f} us + {1e9 * hop.per_byte:.2f} ns/byte per actor "
        f"(receive and hand on); driver {1e6 * hop.driver_base:.0f} us + {1e6 * hop.driver_per_stage:.0f} us per "
        f"stage; raylet and the rest of the machine {1e6 * hop.raylet_per_stage:.0f} us per stage + "
        f"{1e9 * hop.raylet_per_byte:.2f} ns per byte received; between nodes "
        f"{1e9 * hop.cross_node_per_byte:.2f} ns/byte more.",
        "",
        "| configuration | predicted samples/s | measured samples/s | prediction error |",
        "|---|---:|---:|---:|",
    ]
    for name, predicted, got in rows:
        lines.append(f"| {name} | {predicted:,.0f} | {got:,.0f} | {100 * (predicted / got - 1):+.0f}% |")
    kind = "GPUs" if args.device.startswith("cuda") else "devices as fast as one core of this machine"
    lines += [
        "",
        f"**Predicted** (not measured): samples/s of an 8 x 1000 fully connected net (MNIST, microbatch "
        f"{args.batch_size}), one stage per device, {kind}; stages in contiguous blocks over the nodes, 10 Gb/s "
        "between nodes, a host core per device plus two on every node.",
        "",
        "| devices | 1 node | 2 nodes | 4 nodes |",
        "|---:|---:|---:|---:|",
    ]
    for devices in range(1, 9):
        cells = [f"{table[devices, n]:,.0f}" if (devices, n) in table else "-" for n in (1, 2, 4)]
        lines.append(f"| {devices} | " + " | ".join(cells) + " |")
    lines += ["", load_line()]
    write_report(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
