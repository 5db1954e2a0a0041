"""The sequential in-process runner: the very same Stage objects, driven one microbatch at a time
through every stage. It is the reference the Ray pipeline must match bit for bit, the test bed,
and the single-process baseline of the throughput benchmark."""

from __future__ import annotations

from typing import Protocol

import torch

from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.messages import Microbatch, MicrobatchPlan, Prediction, StageStats
from forwardflow.pipeline.source import DataSource
from forwardflow.pipeline.stage import Stage, StageSetup


class Executor(Protocol):
    """What the training loop needs from an executor (sequential here, Ray in ``actors/``)."""

    def submit(self, plan: MicrobatchPlan) -> None:
        """Queue the microbatch ``plan`` describes; the first stage's data source makes it."""

    def completed(self, wait: bool = False) -> list[Prediction]:
        """Predictions finished so far, in stream order; ``wait`` drains everything in flight."""

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

    def close(self) -> None: ...


class SequentialRunner:
    def __init__(
        self,
        setups: list[StageSetup],
        dataset: Dataset,
        device: str = "cpu",
        data_placement: str = "auto",
        streams: bool = False,
    ):
        self.stages = [Stage(setup, device) for setup in setups]
        # The dataset on the stages' device, placed once: a microbatch is gathered there.
        self.source = DataSource(dataset, device, data_placement, streams)
        self._done: list[Prediction] = []

    def submit(self, plan: MicrobatchPlan) -> None:
        message: Microbatch | Prediction = self.source.read(plan)
        for stage in self.stages:
            assert isinstance(message, Microbatch)  # only the last stage returns a Prediction
            message = stage.step(message)
        assert isinstance(message, Prediction)
        self._done.append(message)

    def completed(self, wait: bool = False) -> list[Prediction]:
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

    def close(self) -> None:
        self.stages = []
