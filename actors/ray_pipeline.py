"""The Ray executor: a chain of LayerActors fed by the driver, several microbatches per call.

Ordering: the driver is the single submitter of every actor call, and a synchronous actor runs
one submitter's tasks in submission order (even when a later task's input is ready first). Each
call carries a group of consecutive microbatches, which the actor steps through in order. So every
stage sees microbatch i before i+1, exactly as in the sequential runner, and its input for
microbatch i was computed by upstream weights after their update on i-1: the pipelined run is the
sequential run, with no staleness, and an evaluation pass (which follows its epoch in the stream)
sees the weights after that epoch.

Calls: a call costs far more than the bytes it carries on a small net (benchmarks/ray_calls.py:
actors pushing to their downstream neighbour cost as much as the driver chaining every hop; 4
microbatches per call tripled the rate), so the driver sends ``per_call`` microbatches per actor
call (by default ``window // (stages + 1)``: enough calls in flight for every stage to have one in
hand). A partial group goes out at once when nothing is in flight, so a slow submitter never
waits for company, and whenever the caller drains.

Data path: the dataset goes once to the first stage, which keeps it on its device; per call the
driver sends plans only (sample numbers, crop offsets, flips), never samples. Each stage's call
takes the previous stage's ObjectRef, so activations go from actor to actor through the object
store; activations smaller than Ray's inline limit (100 KiB) travel inside the call's reply and
request, through the driver. Only the last stage's predictions come back to the driver for good.

Memory: at most ``window`` microbatches are in flight (sent or waiting to be grouped); the driver
blocks on the oldest call when the window is full, so the object store holds O(window)
activations for any run length. The driver keeps every stage's result reference of an in-flight
call until its predictions are collected (so that monitoring can count each stage's backlog
without a remote call): at most window x stages activations, the same bound as when they all queue
in front of one stage.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import ray
import torch

from forwardflow.actors.layer_actor import LayerActor
from forwardflow.actors.placement import StageGroup, StagePlacement
from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.messages import MicrobatchPlan, NonFiniteLossError, Prediction, StageStats
from forwardflow.pipeline.stage import StageSetup


@dataclass
class Call:
    """A group of consecutive microbatches sent through every stage: each stage's result reference."""

    refs: list[ray.ObjectRef]
    size: int


def get_unwrapped(refs):
    """``ray.get``, with a stage's NonFiniteLossError raised as itself (not as a RayTaskError)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, NonFiniteLossError):
            raise error.cause from None
        raise


class RayPipeline:
    def __init__(
        self,
        setups: list[StageSetup],
        dataset: Dataset,
        placement: StagePlacement,
        window: int,
        strategy: str = "pack",
        torch_threads: int = 1,
        per_call: int = 0,
        data_placement: str = "auto",
        streams: bool = False,
    ):
        self.window = window
        self.per_call = min(window, per_call or max(1, window // (len(setups) + 1)))
        self.group = StageGroup(len(setups), placement, strategy)
        # The dataset goes once, through the object store, to the first stage, which places it on
        # its device; from then on the driver sends plans (sample numbers, crops, flips) only.
        data = ray.put(dataset)
        self.actors: list = [
            LayerActor.options(**self.group.options(i)).remote(  # type: ignore[attr-defined]
                setup, placement.device, torch_threads, data if i == 0 else None, data_placement, streams
            )
            for i, setup in enumerate(setups)
        ]
        # Sync point: every actor has built its stage before the first microbatch is sent.
        self.locations = ray.get([actor.location.remote() for actor in self.actors])
        self._waiting: list[MicrobatchPlan] = []  # submitted, not sent yet (grouped into the next call)
        self._calls: deque[Call] = deque()  # sent, predictions not collected yet
        self._done: list[Prediction] = []
        self._snapshot_refs: list[ray.ObjectRef] | None = None

    def submit(self, plan: MicrobatchPlan) -> None:
        self._waiting.append(plan)
        if len(self._waiting) >= self.per_call:
            self._send()
        while self.in_flight >= self.window:
            if not self._calls:
                self._send()
            self._done.extend(get_unwrapped(self._calls.popleft().refs[-1]))

    def _send(self) -> None:
        if not self._waiting:
            return
        ref = ray.put(self._waiting)
        refs = []
        for actor in self.actors:
            ref = actor.step.remote(ref)
            refs.append(ref)
        self._calls.append(Call(refs, len(self._waiting)))
        self._waiting = []

    def completed(self, wait: bool = False) -> list[Prediction]:
        if wait or not self._calls:
            self._send()  # nothing in flight, or draining: a partial group need not wait for company
        # Collect finished calls from the front only, to keep stream order.
        while self._calls:
            if not wait:
                ready, _ = ray.wait([self._calls[0].refs[-1]], timeout=0)
                if not ready:
                    break
            self._done.extend(get_unwrapped(self._calls.popleft().refs[-1]))
        done, self._done = self._done, []
        return done

    @property
    def in_flight(self) -> int:
        """Microbatches submitted whose predictions have not been collected yet."""
        return sum(call.size for call in self._calls) + len(self._waiting)

    def stage_backlog(self) -> list[int]:
        """Per stage, the in-flight microbatches handed to it (by the driver or the stage before)
        that it has not finished: its input queue plus the ones it is computing. One non-blocking
        ray.wait over references the driver owns; fetch_local=False copies no activation."""
        refs = [ref for call in self._calls for ref in call.refs]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]) if refs else set()
        backlog, handed = [], sum(call.size for call in self._calls)
        for stage in range(len(self.actors)):
            # A stage finishes calls in stream order, so its ready results are a prefix.
            finished = sum(call.size for call in self._calls if call.refs[stage] in ready)
            backlog.append(handed - finished)
            handed = finished
        return backlog

    def snapshots(self) -> list[StageStats]:
        # One batched round of calls at the caller's cadence; these queue behind the stages'
        # pending calls (same submitter, same order), so they also act as a barrier.
        self._send()
        return get_unwrapped([actor.snapshot.remote() for actor in self.actors])

    def poll_snapshots(self) -> list[StageStats] | None:
        # A snapshot call queues behind the microbatches already submitted to its actor, so
        # waiting on it would drain the pipeline: ask, and pick the answers up on a later poll.
        if self._snapshot_refs is None:
            self._snapshot_refs = [actor.snapshot.remote() for actor in self.actors]
            return None
        ready, _ = ray.wait(self._snapshot_refs, num_returns=len(self._snapshot_refs), timeout=0)
        if len(ready) < len(self._snapshot_refs):
            return None
        snapshots = get_unwrapped(self._snapshot_refs)
        # Ask for the next round at once, so that it is ready by the caller's next poll.
        self._snapshot_refs = [actor.snapshot.remote() for actor in self.actors]
        return snapshots

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        self._send()
        return get_unwrapped([actor.state_dict.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.group.close()
