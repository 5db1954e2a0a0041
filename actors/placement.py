"""Where the stages go: one placement-group bundle per stage, PACK (one node, the default) or
SPREAD (across nodes). A stage gets a whole GPU when the cluster has enough, a share otherwise;
on CPU each stage gets an equal share of the CPUs (a whole CPU per stage would leave stages
pending when there are more stages than cores)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from forwardflow.pipeline.validation import ConfigError

PLACEMENT_TIMEOUT_S = 120


@dataclass(frozen=True)
class StagePlacement:
    device: str  # what the stage passes to torch: "cpu" or "cuda" (Ray sets CUDA_VISIBLE_DEVICES)
    num_cpus: float
    num_gpus: float


def _share(total: float, parts: int) -> float:
    """An equal share, at most 1, rounded *down* to Ray's resource granularity (1e-4) so that
    ``parts`` shares never add up to more than ``total``."""
    return min(1.0, math.floor(total / parts * 10_000) / 10_000)


def plan_placement(num_stages: int, device: str, resources: dict[str, float]) -> StagePlacement:
    """Decide each stage's share from the cluster's resources; raises ConfigError for a device
    the cluster does not have."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus >= 1)
    if use_gpu and gpus < 1:
        raise ConfigError("--device", f"{device!r} asks for a GPU but the Ray cluster has none; use cpu or auto")
    if use_gpu and device.startswith("cuda:"):
        raise ConfigError("--device", "with the Ray executor use cuda (Ray assigns each stage its GPU), not cuda:N")
    cpu_share = _share(cpus, num_stages)
    if cpu_share <= 0:
        raise ConfigError("--address", "the Ray cluster reports no CPUs")
    gpu_share = 0.0
    if use_gpu:
        gpu_share = _share(gpus, num_stages)
    return StagePlacement(device="cuda" if use_gpu else "cpu", num_cpus=cpu_share, num_gpus=gpu_share)


class StageGroup:
    """A placement group reserving one bundle per stage, released on close."""

    def __init__(self, num_stages: int, placement: StagePlacement, strategy: str):
        bundle = {"CPU": placement.num_cpus}
        if placement.num_gpus:
            bundle["GPU"] = placement.num_gpus
        self.group: PlacementGroup = placement_group(
            [dict(bundle) for _ in range(num_stages)], strategy=strategy.upper()
        )
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.group)
            raise RuntimeError(
                f"the Ray cluster could not place {num_stages} stages of {bundle} "
                f"with strategy {strategy} within {PLACEMENT_TIMEOUT_S} s"
            )
        self.placement = placement

    def options(self, stage_index: int) -> dict:
        return {
            "num_cpus": self.placement.num_cpus,
            "num_gpus": self.placement.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=stage_index
            ),
        }

    def close(self) -> None:
        remove_placement_group(self.group)
