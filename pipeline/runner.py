"""The sequential in-process runner: the very same Stage objects, driven one microbatch at a time
through every stage. It is the reference the Ray pipeline must match bit for bit, the test bed,
and the single-process baseline of the throughput benchmark."""

from __future__ import annotations

from typing import Protocol

import torch

from forwardflow.pipeline.checkpoint import load_shard
from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.messages import (
    CheckpointMarker,
    Microbatch,
    MicrobatchPlan,
    Prediction,
    ShardInfo,
    StageStats,
)
from forwardflow.pipeline.source import DataSource
from forwardflow.pipeline.stage import Stage, StageSetup


class Executor(Protocol):
    """What the training loop needs from an executor (sequential here, Ray in ``actors/``).

    A CheckpointMarker is submitted like a microbatch and must reach every stage's ``Stage.step``
    in stream order like one (each stage writes its shard and hands it on); the last stage's
    marker comes back from ``completed`` in its place among the predictions. An executor that
    loses a stage raises StageLostError; ``restore`` then brings every stage back to a checkpoint.
    The driver submits plans (``MicrobatchPlan``); the first stage's data source makes each
    microbatch from its plan where the data lives.
    """

    def submit(self, plan: MicrobatchPlan | CheckpointMarker) -> None: ...

    def completed(self, wait: bool = False) -> list[Prediction | CheckpointMarker]:
        """Predictions (and returned markers) finished so far, in stream order; ``wait`` drains
        everything in flight."""

    def snapshots(self) -> list[StageStats]:
        """Every stage's statistics after all submitted microbatches (waits for them)."""

    def poll_snapshots(self) -> list[StageStats] | None:
        """Non-blocking: the latest round of statistics that has arrived since the last call, or
        None; asks for the next round. Never waits for the pipeline to drain."""

    @property
    def in_flight(self) -> int:
        """Microbatches submitted whose predictions have not been collected yet."""

    def stage_backlog(self) -> list[int]:
        """Non-blocking: per stage, microbatches handed to it that it has not finished yet."""

    def state_dicts(self) -> list[dict[str, torch.Tensor]]: ...

    def restore(self, shards: list[ShardInfo] | None) -> None:
        """Every stage as it was in a checkpoint (its shards, ``file`` a whole path), or as built
        (None); a lost stage is recreated first, where it was. Drops whatever was in flight."""

    def close(self) -> None: ...


def restored_stage(setup: StageSetup, device: str | torch.device, shard: ShardInfo | None) -> Stage:
    """A stage built from its setup, then put in the state of ``shard`` (None: as built)."""
    stage = Stage(setup, device)
    if shard is not None:
        stage.restore(load_shard(shard))
    return stage


class SequentialRunner:
    def __init__(
        self,
        setups: list[StageSetup],
        dataset: Dataset,
        device: str = "cpu",
        data_placement: str = "auto",
        streams: bool = False,
    ):
        self.setups, self.device = setups, device
        self.stages = [Stage(setup, device) for setup in setups]
        # The dataset on the stages' device, placed once: a microbatch is gathered there.
        self.source = DataSource(dataset, device, data_placement, streams)
        self._done: list[Prediction | CheckpointMarker] = []

    def submit(self, plan: MicrobatchPlan | CheckpointMarker) -> None:
        message: Microbatch | Prediction | CheckpointMarker = (
            plan if isinstance(plan, CheckpointMarker) else self.source.read(plan)
        )
        for stage in self.stages:
            assert not isinstance(message, Prediction)  # only the last stage returns a Prediction
            message = stage.step(message)
        assert not isinstance(message, Microbatch)
        self._done.append(message)

    def completed(self, wait: bool = False) -> list[Prediction | CheckpointMarker]:
        done, self._done = self._done, []
        return done

    def snapshots(self) -> list[StageStats]:
        return [stage.snapshot() for stage in self.stages]

    def poll_snapshots(self) -> list[StageStats] | None:
        return self.snapshots()

    @property
    def in_flight(self) -> int:
        return len(self._done)

    def stage_backlog(self) -> list[int]:
        return [0] * len(self.stages)  # submit() runs a microbatch through every stage at once

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [stage.state_dict() for stage in self.stages]

    def restore(self, shards: list[ShardInfo] | None) -> None:
        self._done = []
        chosen: list[ShardInfo | None] = list(shards) if shards else [None] * len(self.setups)
        self.stages = [restored_stage(setup, self.device, shard) for setup, shard in zip(self.setups, chosen)]

    def close(self) -> None:
        self.stages = []
