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
"""

from __future__ import annotations

from collections import deque

import ray
import torch

from forwardflow.actors.layer_actor import LayerActor
from forwardflow.actors.placement import StageGroup, StagePlacement
from forwardflow.pipeline.messages import Microbatch, Prediction, RunStoppedError, StageStats
from forwardflow.pipeline.stage import StageSetup


class RayPipeline:
    def __init__(
        self,
        setups: list[StageSetup],
        placement: StagePlacement,
        window: int,
        strategy: str = "pack",
        torch_threads: int = 1,
    ):
        self.window = window
        self.group = StageGroup(len(setups), placement, strategy)
        self.actors: list = [
            LayerActor.options(**self.group.options(i)).remote(setup, placement.device, torch_threads)  # type: ignore[attr-defined]
            for i, setup in enumerate(setups)
        ]
        # Sync point: every actor has built its stage before the first microbatch is sent.
        self.locations = ray.get([actor.location.remote() for actor in self.actors])
        # Per in-flight microbatch: every stage's result reference; the last is the prediction.
        self._in_flight: deque[list[ray.ObjectRef]] = deque()
        self._done: list[Prediction] = []
        self._snapshot_refs: list[ray.ObjectRef] | None = None

    def submit(self, mb: Microbatch) -> None:
        ref = ray.put(mb)
        refs = []
        for actor in self.actors:
            ref = actor.step.remote(ref)
            refs.append(ref)
        self._in_flight.append(refs)
        while len(self._in_flight) >= self.window:
            self._done.append(self._fetch(self._in_flight.popleft()[-1]))

    def completed(self, wait: bool = False) -> list[Prediction]:
        # Collect finished microbatches from the front only, to keep stream order.
        while self._in_flight:
            if not wait:
                ready, _ = ray.wait([self._in_flight[0][-1]], timeout=0)
                if not ready:
                    break
            self._done.append(self._fetch(self._in_flight.popleft()[-1]))
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

    @staticmethod
    def _fetch(ref: ray.ObjectRef) -> Prediction:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, RunStoppedError):  # a diverged loss, a failed write: one line
                raise error.cause from None
            raise

    def snapshots(self) -> list[StageStats]:
        # One batched round of calls at the caller's cadence; these queue behind the stages'
        # pending microbatches (same submitter, same order), so they also act as a barrier.
        return ray.get([actor.snapshot.remote() for actor in self.actors])

    def poll_snapshots(self) -> list[StageStats] | None:
        # A snapshot call queues behind the microbatches already submitted to its actor, so
        # waiting on it would drain the pipeline: ask, and pick the answers up on a later poll.
        if self._snapshot_refs is None:
            self._snapshot_refs = [actor.snapshot.remote() for actor in self.actors]
            return None
        ready, _ = ray.wait(self._snapshot_refs, num_returns=len(self._snapshot_refs), timeout=0)
        if len(ready) < len(self._snapshot_refs):
            return None
        snapshots = ray.get(self._snapshot_refs)
        # Ask for the next round at once, so that it is ready by the caller's next poll.
        self._snapshot_refs = [actor.snapshot.remote() for actor in self.actors]
        return snapshots

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return ray.get([actor.state_dict.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.group.close()
