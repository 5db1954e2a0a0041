"""One Ray actor per stage. It drives the same ``pipeline.stage.Stage`` as the sequential runner;
Ray only decides where it runs and carries the microbatches."""

from __future__ import annotations

import os
import socket
import time
from typing import TypeGuard

import ray
import torch

from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.device import CopyStream, resolve_device
from forwardflow.pipeline.messages import (
    CheckpointMarker,
    Microbatch,
    MicrobatchPlan,
    Prediction,
    ShardInfo,
    StageStats,
)
from forwardflow.pipeline.runner import restored_stage
from forwardflow.pipeline.source import DataSource
from forwardflow.pipeline.stage import Stage, StageSetup

PROBE_SIZE = 1024


class LayerActor:
    def __init__(
        self,
        setup: StageSetup,
        device: str,
        torch_threads: int,
        dataset: Dataset | None = None,
        data_placement: str = "auto",
        streams: bool = False,
    ):
        # One intra-op thread per stage: several stages share the cores, and more threads per
        # actor made every stage slower through oversubscription.
        torch.set_num_threads(torch_threads)
        self.setup, self.device = setup, resolve_device(device)
        self.stage = Stage(setup, self.device)
        # The first stage holds the dataset (sent once, through the object store) on its device and
        # makes each microbatch from the plan the driver sends.
        self.source = None if dataset is None else DataSource(dataset, self.device, data_placement, streams)
        # --streams on a GPU: a call's inputs are all copied in on a side stream at once, and each
        # result is copied out there while the next microbatch computes; one wait per call.
        self.copies = CopyStream(self.device) if streams and self.device.type == "cuda" else None
        self._last_step_end: float | None = None  # perf_counter() when the previous step returned
        # Whether this stage's outputs go on by Ray Direct Transport (actors/transport.py): then they
        # stay on the device and Ray moves them device to device; else they go through the object
        # store, which lives in host memory.
        self.direct_out = False

    def step(
        self, group: list[MicrobatchPlan | Microbatch | CheckpointMarker]
    ) -> list[Microbatch | Prediction | CheckpointMarker]:
        """The stage's step on each message of a call, in order; the results go on as one object.
        The first stage receives plans and makes the microbatches from its dataset; a checkpoint
        marker among them is handled in its place in the order."""
        # The time split for monitoring: a few clock reads per microbatch, kept in the stage's
        # counters and fetched with its snapshot (no extra remote call).
        started = time.perf_counter()
        stats = self.stage.stats
        if self._last_step_end is not None:
            stats.wait_s += started - self._last_step_end
        if self.copies is not None:
            return self._step_with_copy_stream(group, self.copies, stats)
        results: list[Microbatch | Prediction | CheckpointMarker] = []
        for item in group:
            result = self.stage.step(self._microbatch(item))
            computed = time.perf_counter()
            # The object store lives in host memory: hand on CPU tensors, and let the next stage
            # copy them to its own device (which may be another GPU on another node). On a GPU this
            # copy is the executor's sync point per microbatch, not the stage's. A direct hand-off
            # leaves them where they are: Ray's transport waits for the stage's stream itself.
            if self._goes_through_host(result):
                result = result.cpu() if isinstance(result, Prediction) else result.to("cpu")
            results.append(result)
            stats.handoff_s += time.perf_counter() - computed
        self._last_step_end = time.perf_counter()
        return results

    def _step_with_copy_stream(
        self, group: list[MicrobatchPlan | Microbatch | CheckpointMarker], copies: CopyStream, stats: StageStats
    ) -> list[Microbatch | Prediction | CheckpointMarker]:
        staged: list[tuple[Microbatch | CheckpointMarker, torch.cuda.Event | None]] = []
        for item in group:
            mb = self._microbatch(item)
            on_host = isinstance(mb, Microbatch) and mb.inputs.device.type == "cpu"
            staged.append(copies.to_device(mb) if on_host else (mb, None))  # type: ignore[arg-type]
        results: list[Microbatch | Prediction | CheckpointMarker] = []
        for staged_message, copied in staged:
            message = staged_message
            if copied is not None:
                assert isinstance(message, Microbatch)
                message = copies.use(message, copied)
            result = self.stage.step(message)
            results.append(copies.to_host(result) if self._goes_through_host(result) else result)
        waiting = time.perf_counter()
        copies.finish()  # the call's one wait: its results are in host memory once it returns
        self._last_step_end = time.perf_counter()
        stats.handoff_s += self._last_step_end - waiting
        return results

    def _goes_through_host(
        self, result: Microbatch | Prediction | CheckpointMarker
    ) -> TypeGuard[Microbatch | Prediction]:
        """Whether a step's result is copied to host memory before it goes on: predictions always
        (the driver reads them), microbatches unless this stage hands on directly, markers never."""
        return isinstance(result, Prediction) or (isinstance(result, Microbatch) and not self.direct_out)

    def _microbatch(self, item: MicrobatchPlan | Microbatch | CheckpointMarker) -> Microbatch | CheckpointMarker:
        if not isinstance(item, MicrobatchPlan):
            return item
        assert self.source is not None, "plans go to the first stage, which holds the dataset"
        return self.source.read(item)

    def snapshot(self) -> StageStats:
        snapshot = self.stage.snapshot()
        # The snapshot's own work (weight norms) is neither computing nor waiting for input.
        if self._last_step_end is not None:
            self._last_step_end = time.perf_counter()
        return snapshot

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.stage.state_dict()

    def restore(self, shard: ShardInfo | None) -> None:
        """The stage as it was in a checkpoint (None: as built); the shard is read here, where the
        stage runs, from storage every node sees (or handed over with its data)."""
        self.stage = restored_stage(self.setup, self.device, shard)
        self._last_step_end = None

    def hand_on_direct(self, direct: bool) -> None:
        self.direct_out = direct

    def probe(self) -> torch.Tensor:
        """A small tensor on this stage's device, sent over a direct hop before training (see
        actors/transport.py): its neighbour checks that it arrived intact."""
        return torch.arange(PROBE_SIZE, dtype=torch.float32, device=self.device)

    def received_probe(self, tensor: torch.Tensor) -> bool:
        return bool(torch.equal(tensor.cpu(), torch.arange(PROBE_SIZE, dtype=torch.float32)))

    def location(self) -> dict[str, str]:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "actor_id": ray.get_runtime_context().get_actor_id() or "",
            "device": str(self.stage.device),
            "gpus": ",".join(str(g) for g in ray.get_gpu_ids()),
        }


# max_task_retries=0 and max_restarts=0: Ray guarantees that a synchronous actor runs the tasks
# of one submitter in submission order only while no task is retried. A retried or restarted
# stage would also have lost its weights, so a failure stops the run instead.
# The direct variant can hand its outputs on by Ray Direct Transport. Ray fixes that per class, and
# then runs the actor's tasks on a background thread, still one at a time in the default
# concurrency group (so submission order holds as above); the transfers run in Ray's own
# "_ray_system" group.
_REMOTE_CLASSES = {
    False: ray.remote(max_restarts=0, max_task_retries=0)(LayerActor),
    # ray.remote's type stubs do not list enable_tensor_transport yet.
    True: ray.remote(max_restarts=0, max_task_retries=0, enable_tensor_transport=True)(LayerActor),  # type: ignore[call-overload]
}


def layer_actor_class(direct: bool):
    """The Ray actor class of a stage: able to use Ray Direct Transport or not."""
    return _REMOTE_CLASSES[direct]
