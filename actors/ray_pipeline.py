"""The Ray executor: a chain of LayerActors fed by the driver.

Ordering: the driver is the single submitter of every actor call, and a synchronous actor runs
one submitter's tasks in submission order (even when a later task's input is ready first). So
every stage sees microbatch i before i+1, exactly as in the sequential runner, and its input for
microbatch i was computed by upstream weights after their update on i-1: the pipelined run is the
sequential run, with no staleness.

Data path: each stage's call takes the previous stage's ObjectRef, so activations go from actor
to actor through the object store and never through the driver; only the last stage's small
Prediction comes back. Activations larger than Ray's inline limit (100 KiB by default) stay in the
shared-memory store of their node; raising the limit would route them through the driver.

Memory: at most ``window`` microbatches are in flight; the driver blocks on the oldest when the
window is full, so the object store holds O(window) activations for any run length. The driver
keeps every stage's result reference of an in-flight microbatch until its prediction is collected
(so that monitoring can count each stage's backlog without a remote call): at most
window x stages activations, the same bound as when they all queue in front of one stage.

Checkpoints and faults: a CheckpointMarker is submitted like a microbatch and takes the same
ordered path through the actors, so every stage writes its shard after the same microbatch. An
actor that dies surfaces as StageLostError where its results are fetched (actors/recovery.py);
``restore`` recreates it in its own bundle of the placement group and puts every stage back to a
checkpoint. Ray's own actor restarts stay off: a restarted actor would have lost its state and
could run the submitter's queued tasks out of order.
"""

from __future__ import annotations

import os
from collections import deque

import ray
import torch

from forwardflow.actors.layer_actor import LayerActor
from forwardflow.actors.placement import StageGroup, StagePlacement
from forwardflow.actors.recovery import LOST, lost_actors, stage_lost
from forwardflow.pipeline.messages import (
    CheckpointMarker,
    Microbatch,
    Prediction,
    RunStoppedError,
    ShardInfo,
    StageStats,
)
from forwardflow.pipeline.stage import StageSetup


class RayPipeline:
    def __init__(
        self,
        setups: list[StageSetup],
        placements: list[StagePlacement],
        window: int,
        torch_threads: int = 1,
    ):
        self.window = window
        self.setups, self.placements, self.torch_threads = setups, placements, torch_threads
        self.group = StageGroup(placements)
        self.actors: list = [self._make_actor(stage) for stage in range(len(setups))]
        # Sync point: every actor has built its stage before the first microbatch is sent.
        self.locations: list[dict[str, str]] = ray.get([actor.location.remote() for actor in self.actors])
        # Per in-flight microbatch (or checkpoint marker): every stage's result reference; the last
        # is the prediction (or the marker, back).
        self._in_flight: deque[list[ray.ObjectRef]] = deque()
        self._done: list[Prediction | CheckpointMarker] = []
        self._snapshot_refs: list[ray.ObjectRef] | None = None

    def _make_actor(self, stage: int):
        """The stage's actor, in the stage's own bundle of the placement group (a recreated one
        goes where the lost one was, or where Ray moves the bundle when its node is gone)."""
        options = self.group.options(stage)
        device = self.placements[stage].device
        return LayerActor.options(**options).remote(self.setups[stage], device, self.torch_threads)  # type: ignore[attr-defined]

    def submit(self, mb: Microbatch | CheckpointMarker) -> None:
        ref = ray.put(mb)
        refs = []
        for actor in self.actors:
            ref = actor.step.remote(ref)
            refs.append(ref)
        self._in_flight.append(refs)
        while len(self._in_flight) >= self.window:
            self._done.append(self._get(self._in_flight.popleft()[-1]))

    def completed(self, wait: bool = False) -> list[Prediction | CheckpointMarker]:
        # Collect finished microbatches from the front only, to keep stream order.
        while self._in_flight:
            if not wait:
                ready, _ = ray.wait([self._in_flight[0][-1]], timeout=0)
                if not ready:
                    break
            self._done.append(self._get(self._in_flight.popleft()[-1]))
        done, self._done = self._done, []
        return done

    @property
    def in_flight(self) -> int:
        """Microbatches submitted whose predictions have not been collected yet."""
        return len(self._in_flight)

    def stage_backlog(self) -> list[int]:
        """Per stage, the in-flight microbatches handed to it (by the driver or the stage before)
        that it has not finished: its input queue plus the one it is computing. One non-blocking
        ray.wait over references the driver owns; fetch_local=False copies no activation."""
        refs = [ref for entry in self._in_flight for ref in entry]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]) if refs else set()
        backlog, handed = [], len(self._in_flight)
        for stage in range(len(self.actors)):
            # A stage finishes microbatches in stream order, so its ready results are a prefix.
            finished = sum(entry[stage] in ready for entry in self._in_flight)
            backlog.append(handed - finished)
            handed = finished
        return backlog

    def _get(self, refs):
        """ray.get, with a stage's own stop (a diverged loss, a failed write) passed on as it is
        and a lost actor or node as StageLostError."""
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, RunStoppedError):
                raise error.cause from None
            if isinstance(error, LOST) or isinstance(error.cause, LOST):
                raise stage_lost(error, self.locations) from None
            raise
        except LOST as error:
            raise stage_lost(error, self.locations) from None

    def snapshots(self) -> list[StageStats]:
        # One batched round of calls at the caller's cadence; these queue behind the stages'
        # pending microbatches (same submitter, same order), so they also act as a barrier.
        return self._get([actor.snapshot.remote() for actor in self.actors])

    def poll_snapshots(self) -> list[StageStats] | None:
        # A snapshot call queues behind the microbatches already submitted to its actor, so
        # waiting on it would drain the pipeline: ask, and pick the answers up on a later poll.
        if self._snapshot_refs is None:
            self._snapshot_refs = [actor.snapshot.remote() for actor in self.actors]
            return None
        ready, _ = ray.wait(self._snapshot_refs, num_returns=len(self._snapshot_refs), timeout=0)
        if len(ready) < len(self._snapshot_refs):
            return None
        snapshots = self._get(self._snapshot_refs)
        # Ask for the next round at once, so that it is ready by the caller's next poll.
        self._snapshot_refs = [actor.snapshot.remote() for actor in self.actors]
        return snapshots

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return self._get([actor.state_dict.remote() for actor in self.actors])

    def restore(self, shards: list[ShardInfo] | None) -> None:
        """Recreate the lost actors (same placement), then put every stage back to the checkpoint;
        what was in flight is dropped (the training loop submits it again)."""
        lost = lost_actors(self.actors)  # waits until no old step is left running
        # The results dropped here hold the lost stage's error, which the driver has handled; Ray
        # would log each one as "unhandled" when it is freed (the driver fetches every result it
        # needs, so no other error goes unfetched).
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        self._in_flight.clear()
        self._done, self._snapshot_refs = [], None
        for stage in lost:
            self.actors[stage] = self._make_actor(stage)
        self.locations = self._get([actor.location.remote() for actor in self.actors])
        chosen: list[ShardInfo | None] = list(shards) if shards else [None] * len(self.actors)
        self._get([actor.restore.remote(shard) for actor, shard in zip(self.actors, chosen)])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.group.close()
