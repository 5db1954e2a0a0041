"""Noticing a lost stage and finding which actors must be recreated.

A stage's actor is lost when its process dies (killed, out of memory, a crash) or its node does.
The driver notices when it fetches anything that stage produced or depends on: Ray raises
ActorDiedError (or the same error wrapped in RayTaskError by the stages after it, whose input never
came), or ObjectLostError when a node took a result with it. Those become StageLostError, which the
training loop recovers from by restoring every stage from the last checkpoint.
"""

from __future__ import annotations

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from forwardflow.pipeline.messages import StageLostError

PING_TIMEOUT_S = 120.0  # a live actor answers once the steps already queued to it are done
LOST = (RayActorError, ObjectLostError)


def stage_lost(error: BaseException, locations: list[dict[str, str]]) -> StageLostError:
    """The StageLostError for a Ray error, naming the stage whose actor died when Ray says which."""
    cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    actor_id = getattr(cause, "actor_id", None)
    for stage, location in enumerate(locations):
        if actor_id and location.get("actor_id") == actor_id:
            return StageLostError(stage, f"its actor died (pid {location['pid']} on {location['host']})")
    return StageLostError(None, f"a stage's actor or its node died ({type(cause).__name__})")


def lost_actors(actors: list) -> list[int]:
    """The stages whose actor is dead, or hung (no answer within PING_TIMEOUT_S: it is killed).
    The pings queue behind whatever each live actor still has to do, so when this returns no old
    step is left running anywhere."""
    pings = [actor.location.remote() for actor in actors]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=PING_TIMEOUT_S)
    lost = []
    for stage, ping in enumerate(pings):
        if ping not in ready:
            ray.kill(actors[stage])
            lost.append(stage)
            continue
        try:
            ray.get(ping)
        except LOST:
            lost.append(stage)
    return lost
