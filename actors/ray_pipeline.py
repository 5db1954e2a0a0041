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
call (decided with the window by launch/build.py ``ray_calls``: by default
``window // (stages + 1)``, enough calls in flight for every stage to have one in hand). A partial
group goes out at once when nothing is in flight, so a slow submitter never waits for company, and
whenever the caller drains.

Data path: the dataset goes once to the first stage, which keeps it on its device; per call the
driver sends plans only (sample numbers, crop offsets, flips), never samples. Each stage's call
takes the previous stage's ObjectRef, so activations go from actor to actor through the object
store; activations smaller than Ray's inline limit (100 KiB) travel inside the call's reply and
request, through the driver. Between CUDA stages they go by Ray Direct Transport instead, device to
device (actors/transport.py chooses per hop, after the actors are up and before the first
microbatch). Only the last stage's predictions come back to the driver for good.

Memory: at most ``window`` microbatches are in flight (sent or waiting to be grouped); the driver
blocks on the oldest call when the window is full, so the object store holds O(window)
activations for any run length. The driver keeps every stage's result reference of an in-flight
call until its predictions are collected (so that monitoring can count each stage's backlog
without a remote call): at most window x stages activations, the same bound as when they all queue
in front of one stage.

Checkpoints and faults: a CheckpointMarker is submitted like a microbatch, goes in a call's group
in its place among the microbatches and takes the same ordered path through the actors, so every
stage writes its shard after the same microbatch. An actor that dies surfaces as StageLostError
where its results are fetched (actors/recovery.py); ``restore`` recreates it in its own bundle of
the placement group and puts every stage back to a checkpoint. Ray's own actor restarts stay
off: a restarted actor would have lost its state and could run the submitter's queued tasks out
of order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import ray
import torch

from forwardflow.actors.layer_actor import layer_actor_class
from forwardflow.actors.placement import StageGroup, StagePlacement, cluster_nodes
from forwardflow.actors.recovery import LOST, lost_actors, stage_lost
from forwardflow.actors.transport import (
    OBJECT_STORE,
    DirectGroups,
    HandOff,
    check_transport,
    describe,
    may_go_direct,
    plan_hand_offs,
    probe,
)
from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.messages import (
    CheckpointMarker,
    MicrobatchPlan,
    Prediction,
    RunStoppedError,
    ShardInfo,
    StageStats,
)
from forwardflow.pipeline.stage import StageSetup


class TransportError(RunStoppedError):
    """A transport asked for by name (--transport) did not work between two stages."""


class StageStartError(RunStoppedError):
    """A stage's actor could not be built or placed (at the start, or when recreated)."""


START_TIMEOUT_S = (
    300.0  # for every actor to build its stage: a worker that imports torch on a busy node, a dataset to place
)


@dataclass
class Call:
    """A group of consecutive microbatches sent through every stage: each stage's result reference."""

    refs: list[ray.ObjectRef]
    size: int


class RayPipeline:
    def __init__(
        self,
        setups: list[StageSetup],
        dataset: Dataset,
        placements: list[StagePlacement],
        window: int,
        per_call: int,
        torch_threads: int = 1,
        data_placement: str = "auto",
        streams: bool = False,
        transport: str = "auto",
    ):
        self.window = window
        self.per_call = per_call
        self.setups, self.placements, self.torch_threads = setups, placements, torch_threads
        self.data_placement, self.streams = data_placement, streams
        devices = [placement.device for placement in placements]
        check_transport(transport, devices)  # before any actor starts
        self.transport, self.direct_groups = transport, DirectGroups()
        self.actor_class = layer_actor_class(may_go_direct(transport, devices))
        self.group = StageGroup(placements)
        self.actors: list = []
        self.locations: list[dict[str, str]] = []
        self.hand_offs: list[HandOff] = []
        self._steps: list = []
        # Whatever stops the start (a stage that cannot be built, a signal, a transport) leaves no
        # actor and no reservation behind: the caller has no pipeline to close yet.
        try:
            # The dataset goes once, through the object store, to the first stage, which places it
            # on its device; from then on the driver sends plans (sample numbers, crops, flips)
            # only. The reference is kept for a first stage that has to be recreated.
            self._dataset = ray.put(dataset)
            self.actors = [self._make_actor(stage) for stage in range(len(setups))]
            # Sync point: every actor has built its stage before the first microbatch is sent.
            self.locations = self._started([actor.location.remote() for actor in self.actors], first=True)
            self._connect()
        except BaseException:
            self.close()
            raise
        # Submitted, not sent yet (grouped into the next call): plans, and checkpoint markers in
        # their place in the stream.
        self._waiting: list[MicrobatchPlan | CheckpointMarker] = []
        self._calls: deque[Call] = deque()  # sent, predictions (and markers) not collected yet
        self._done: list[Prediction | CheckpointMarker] = []
        self._snapshot_refs: list[ray.ObjectRef] | None = None

    def _make_actor(self, stage: int):
        """The stage's actor, in the stage's own bundle of the placement group (a recreated one
        goes where the lost one was: a bundle stays on its planned node)."""
        options = self.group.options(stage)
        device = self.placements[stage].device
        data = self._dataset if stage == 0 else None
        return self.actor_class.options(**options).remote(
            self.setups[stage], device, self.torch_threads, data, self.data_placement, self.streams
        )

    def submit(self, plan: MicrobatchPlan | CheckpointMarker) -> None:
        self._waiting.append(plan)
        if len(self._waiting) >= self.per_call:
            self._send()
        while self.in_flight >= self.window:
            if not self._calls:
                self._send()
            self._done.extend(self._get(self._calls.popleft().refs[-1]))

    def _send(self) -> None:
        if not self._waiting:
            return
        ref = ray.put(self._waiting)
        refs = []
        for step in self._steps:
            ref = step.remote(ref)
            refs.append(ref)
        self._calls.append(Call(refs, len(self._waiting)))
        self._waiting = []

    def _connect(self) -> None:
        """Choose each hop's transport (actors/transport.py), set up the collective groups and try
        each direct hop once. With --transport auto a failing direct hop falls back to the object
        store (with the reason, for the report); a transport asked for by name stops the run."""
        self.direct_groups.destroy()
        hand_offs = plan_hand_offs(self.transport, self.locations)
        if any(hand_off.direct for hand_off in hand_offs):
            try:
                self.direct_groups.create(self.actors, hand_offs)
                problems = probe(self.actors, hand_offs)
            except Exception as error:  # a transport that cannot start is not used
                problems = [describe(error) if h.direct else None for h in hand_offs]
            if any(problems):
                stage, problem = next((s, p) for s, p in enumerate(problems) if p)
                # A failed group leaves errors in actor calls that nobody fetches, which Ray would
                # log as "unhandled" when freed; the reason is reported here instead.
                os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
                self.direct_groups.destroy()
                if self.transport != "auto":
                    raise TransportError(
                        f"--transport {self.transport}: stage {stage} could not hand on to stage "
                        f"{stage + 1} ({problem})"
                    )
                # Every hop falls back, not only the failing one: the groups span several hops.
                why = f"direct transport failed at the start ({problem})"
                hand_offs = [HandOff(OBJECT_STORE, why if h.direct else h.reason) for h in hand_offs]
                # An actor may still be inside the failed set-up (a group that never formed, a
                # probe it waits to receive), where every later call to it would queue for good:
                # the stages are made anew, before any of them has learned or loaded anything.
                self._remake_actors(range(len(self.actors)))
        self.hand_offs = hand_offs
        # Each stage's step as the driver calls it, its hop's transport bound once here.
        self._steps = [
            actor.step.options(tensor_transport=h.ray_name) if h.direct else actor.step
            for actor, h in zip(self.actors, hand_offs)
        ]
        self._get([actor.hand_on_direct.remote(h.direct) for actor, h in zip(self.actors, hand_offs)])

    def _remake_actors(self, stages: Iterable[int]) -> None:
        """Kill these stages' actors (dead ones too) and make them anew where they were; then
        learn where every actor runs."""
        for stage in stages:
            ray.kill(self.actors[stage])
            self.actors[stage] = self._make_actor(stage)
        self.locations = self._started([actor.location.remote() for actor in self.actors])

    def _started(self, pings: list[ray.ObjectRef], first: bool = False) -> list[dict[str, str]]:
        """Every actor's location, once each has built its stage; StageStartError for one not
        placed (its bundle's node is gone) within START_TIMEOUT_S, and at the ``first`` start for
        one that cannot be built. Later, a stage that dies is lost like any other (StageLostError)."""
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=START_TIMEOUT_S)
        for stage, ping in enumerate(pings):
            if ping not in ready:
                raise StageStartError(
                    f"stage {stage}'s actor did not start within {START_TIMEOUT_S:.0f} s "
                    f"(its reservation is on node {self.placements[stage].node_id[:8]}: is that node gone?)"
                )
        if not first:
            return self._get(pings)
        try:
            return ray.get(pings)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, RunStoppedError):
                raise error.cause from None
            raise StageStartError(f"a stage could not start ({describe(error)})") from None
        except ray.exceptions.RayError as error:
            raise StageStartError(f"a stage could not start ({describe(error)})") from None

    def completed(self, wait: bool = False) -> list[Prediction | CheckpointMarker]:
        if wait or not self._calls:
            self._send()  # nothing in flight, or draining: a partial group need not wait for company
        # Collect finished calls from the front only, to keep stream order.
        while self._calls:
            if not wait:
                ready, _ = ray.wait([self._calls[0].refs[-1]], timeout=0)
                if not ready:
                    break
            self._done.extend(self._get(self._calls.popleft().refs[-1]))
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
        # pending calls (same submitter, same order), so they also act as a barrier.
        self._send()
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
        self._send()
        return self._get([actor.state_dict.remote() for actor in self.actors])

    def restore(self, shards: list[ShardInfo] | None) -> None:
        """Recreate the lost actors (same placement), then put every stage back to the checkpoint;
        what was in flight is dropped (the training loop submits it again)."""
        lost = lost_actors(self.actors)  # waits until no old step is left running
        # The results dropped here hold the lost stage's error, which the driver has handled; Ray
        # would log each one as "unhandled" when it is freed (the driver fetches every result it
        # needs, so no other error goes unfetched).
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        self._calls.clear()
        self._waiting = []
        self._done, self._snapshot_refs = [], None
        alive = {node.node_id for node in cluster_nodes()}
        gone = [stage for stage in lost if self.placements[stage].node_id not in alive]
        if gone:
            # Each stage's reservation is pinned to its planned node, so Ray cannot move it: the
            # run stops at its last checkpoint, and --resume plans the stages on the nodes left.
            node = self.placements[gone[0]].node_id[:8]
            raise StageStartError(
                f"stage {gone[0]} was lost with its node {node}, and a stage is not moved off its planned "
                "node within a run; --resume plans the stages anew on the nodes left"
            )
        if lost and self.direct_groups.groups:
            # A collective group does not take a new member: its survivors keep the dead peer's
            # connections (gloo answers "broken pipe"). Every stage goes back to the checkpoint
            # anyway, so every actor is made anew and the groups with them.
            self.direct_groups.destroy()
            lost = list(range(len(self.actors)))
        self._remake_actors(lost)
        if lost:
            # New actors, and maybe another GPU: the transports are chosen again, before the
            # shards are loaded, since a failed direct hop makes every actor anew.
            self._connect()
        chosen: list[ShardInfo | None] = list(shards) if shards else [None] * len(self.actors)
        self._get([actor.restore.remote(shard) for actor, shard in zip(self.actors, chosen)])

    def close(self) -> None:
        self.direct_groups.destroy()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.group.close()
