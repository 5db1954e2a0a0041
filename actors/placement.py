"""Where the stages go, decided before any actor starts.

The plan is made from the cluster's nodes (``cluster_nodes``): each stage gets a node and a
reservation (CPUs, GPUs), and ``StageGroup`` reserves exactly that, one placement-group bundle per
stage pinned to its node by Ray's node-id label. So the placement printed at the start is the one
the run gets, and a plan the cluster cannot hold is refused with a ConfigError (exit 2, one line)
instead of a placement group that waits forever.

- ``--placement pack`` (the default): as few nodes as possible, the driver's node first.
- ``--placement spread``: the stages in contiguous, balanced blocks over the nodes (stage i and i+1
  share a node where they can, so that only block boundaries cross the network); needs two nodes.
- GPUs (``--device cuda``, or ``auto`` on a cluster with GPUs): a whole GPU per stage when the
  cluster has at least as many GPUs as stages, otherwise equal shares (1/k of a GPU, so that k
  stages fit on one GPU exactly). ``--gpus-per-stage`` asks for a fixed amount.
- CPUs: an equal share of the node's CPUs, at most 1 (a whole CPU per stage would leave stages
  pending when there are more stages than cores); ``--cpus-per-stage`` asks for a fixed amount.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from forwardflow.pipeline.config import ExecutionConfig
from forwardflow.pipeline.messages import RunStoppedError
from forwardflow.pipeline.validation import ConfigError

PLACEMENT_TIMEOUT_S = 120
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries it
RESOURCE_STEPS = 10_000  # Ray reserves fractions in steps of 1/10000


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    address: str  # the node's IP as Ray knows it
    cpus: float
    gpus: float

    @property
    def short_id(self) -> str:
        return self.node_id[:8]


@dataclass(frozen=True)
class StagePlacement:
    device: str  # what the stage passes to torch: "cpu" or "cuda" (Ray sets CUDA_VISIBLE_DEVICES)
    num_cpus: float
    num_gpus: float
    node_id: str
    node_address: str


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the connected cluster, the driver's node first."""
    here = ray.get_runtime_context().get_node_id()
    nodes = [
        NodeResources(
            node_id=node["NodeID"],
            address=node["NodeManagerAddress"],
            cpus=float(node["Resources"].get("CPU", 0.0)),
            gpus=float(node["Resources"].get("GPU", 0.0)),
        )
        for node in ray.nodes()
        if node["Alive"]
    ]
    return sorted(nodes, key=lambda node: node.node_id != here)


def _share(total: float, parts: int) -> float:
    """An equal share, at most 1, rounded *down* to Ray's granularity so that ``parts`` shares
    never add up to more than ``total``."""
    return min(1.0, math.floor(total / parts * RESOURCE_STEPS) / RESOURCE_STEPS)


def _gpu_capacity(gpus: float, per_stage: float) -> int:
    """How many stages asking for ``per_stage`` GPUs a node with ``gpus`` GPUs holds: a fraction
    must fit within one GPU, so k stages of 1/k share each GPU."""
    if per_stage <= 1:
        return math.floor(1 / per_stage + 1e-9) * math.floor(gpus)
    return math.floor(gpus / per_stage)


def _describe(nodes: list[NodeResources], use_gpu: bool) -> str:
    kind = "GPU" if use_gpu else "CPU"
    counts = ", ".join(f"{node.short_id} {node.gpus if use_gpu else node.cpus:g}" for node in nodes)
    return f"{len(nodes)} node(s) with {kind}s: {counts}"


def _counts(num_stages: int, capacities: list[int], spread: bool) -> list[int]:
    """Stages per node. Pack: fill the nodes in order. Spread: round robin over the nodes that have
    room, so that the blocks are as even as the capacities allow."""
    counts = [0] * len(capacities)
    if spread:
        remaining = num_stages
        while remaining:
            open_nodes = [i for i, capacity in enumerate(capacities) if counts[i] < capacity]
            if not open_nodes:
                break
            for i in open_nodes[:remaining]:
                counts[i] += 1
            remaining = num_stages - sum(counts)
    else:
        for i, capacity in enumerate(capacities):
            counts[i] = min(capacity, num_stages - sum(counts))
    return counts


def plan_placement(num_stages: int, execution: ExecutionConfig, nodes: list[NodeResources]) -> list[StagePlacement]:
    """Every stage's node and reservation; ConfigError when the cluster cannot hold the plan (the
    device, the stage count, the per-stage amounts or the strategy)."""
    device, spread = execution.device, execution.placement_strategy == "spread"
    total_gpus = sum(node.gpus for node in nodes)
    use_gpu = device.startswith("cuda") or (device == "auto" and total_gpus >= 1)
    if use_gpu and total_gpus < 1:
        raise ConfigError("--device", f"{device!r} asks for a GPU but the Ray cluster has none; use cpu or auto")
    if use_gpu and device.startswith("cuda:"):
        raise ConfigError("--device", "with the Ray executor use cuda (Ray assigns each stage its GPU), not cuda:N")
    if not use_gpu and execution.gpus_per_stage:
        raise ConfigError("--gpus-per-stage", "applies to GPU runs only (--device cuda, or auto with GPUs)")
    usable = [node for node in nodes if node.cpus > 0 and (node.gpus >= 1 or not use_gpu)]
    if not usable:
        raise ConfigError("--address", "the Ray cluster reports no CPUs" + (" on its GPU nodes" if use_gpu else ""))
    if spread and len(usable) < 2:
        raise ConfigError(
            "--placement", f"spread needs a Ray cluster of 2 or more nodes; this one has {_describe(usable, use_gpu)}"
        )
    if spread and num_stages < 2:
        raise ConfigError("--placement", "spread needs 2 or more stages (--stages)")
    cpus_each = execution.cpus_per_stage
    if use_gpu:
        # Most GPUs first: a whole GPU per stage on as few nodes as possible.
        usable = sorted(usable, key=lambda node: -node.gpus)
        whole_gpus = math.floor(total_gpus)
        gpus_each = execution.gpus_per_stage or (
            1.0 if whole_gpus >= num_stages else 1 / math.ceil(num_stages / whole_gpus)
        )
        capacities = [_gpu_capacity(node.gpus, gpus_each) for node in usable]
    else:
        gpus_each = 0.0
        capacities = [num_stages] * len(usable)  # equal CPU shares always fit
    if cpus_each:
        capacities = [min(cap, math.floor(node.cpus / cpus_each + 1e-9)) for cap, node in zip(capacities, usable)]
    counts = _counts(num_stages, capacities, spread)
    if sum(counts) < num_stages:
        asked = (f"{gpus_each:g} GPU" if use_gpu else "") + (" and " if use_gpu and cpus_each else "")
        asked += f"{cpus_each:g} CPU" if cpus_each else ""
        # The amount per stage the user asked for, where there is one: fewer stages may not help.
        where = "--stages"
        if use_gpu and execution.gpus_per_stage:
            where = "--gpus-per-stage"
        elif cpus_each:
            where = "--cpus-per-stage"
        raise ConfigError(
            where,
            f"{num_stages} stages of {asked} each do not fit the Ray cluster ({_describe(usable, use_gpu)}; "
            f"at most {sum(capacities)} fit)",
        )
    placements = []
    for node, count in zip(usable, counts):
        if not count:
            continue
        cpus = cpus_each or _share(node.cpus, count)
        node_gpus = gpus_each
        if use_gpu and not execution.gpus_per_stage:
            # A node that has a GPU for each of its stages gives whole ones.
            node_gpus = 1.0 if node.gpus >= count else 1 / math.ceil(count / math.floor(node.gpus))
        placements += [
            StagePlacement(
                device="cuda" if use_gpu else "cpu",
                num_cpus=cpus,
                num_gpus=node_gpus,
                node_id=node.node_id,
                node_address=node.address,
            )
        ] * count
    return placements


class PlacementTimeoutError(RunStoppedError):
    """The cluster did not reserve the stages' resources in time (held by other jobs)."""


class StageGroup:
    """A placement group reserving each stage's bundle on its planned node, released on close."""

    def __init__(self, placements: list[StagePlacement]):
        bundles = []
        for stage in placements:
            bundle = {"CPU": stage.num_cpus}
            if stage.num_gpus:
                bundle["GPU"] = stage.num_gpus
            bundles.append(bundle)
        self.group: PlacementGroup = placement_group(
            bundles, strategy="PACK", bundle_label_selector=[{NODE_ID_LABEL: stage.node_id} for stage in placements]
        )
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.group)
            raise PlacementTimeoutError(
                f"the Ray cluster could not reserve {bundles} on the planned nodes within {PLACEMENT_TIMEOUT_S} s "
                "(resources held by other jobs?)"
            )
        self.placements = placements

    def options(self, stage_index: int) -> dict:
        stage = self.placements[stage_index]
        return {
            "num_cpus": stage.num_cpus,
            "num_gpus": stage.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=stage_index
            ),
        }

    def close(self) -> None:
        remove_placement_group(self.group)
