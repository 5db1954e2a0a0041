"""How a stage's activations reach the next stage on Ray: the object store, or Ray Direct
Transport (RDT), which keeps GPU tensors on the GPU.

Through the object store a CUDA stage copies its outputs to host memory, Ray copies them into
shared memory, and the next stage copies them back onto its GPU: two host copies and a sync per
hop. With RDT the reply holds only the tensors' metadata; the tensors stay on the sender's device
and go device to device when the receiver's call runs:

- ``cuda-ipc``: the two stages share one GPU (fractional GPUs on one node); the receiver maps the
  sender's memory, with no copy at all. NCCL refuses two ranks on one GPU, so this is the only
  direct way there.
- ``nccl``: the stages have GPUs of their own, on one node or several; needs a collective group
  of the stages' actors.
- ``gloo``: CPU tensors through a gloo collective group. Never chosen by ``auto``: on a CPU the
  object store is faster (benchmarks/ray_calls.py --direct); it is here to measure that and to
  exercise the direct path where there is no GPU (the tests).

``--transport auto`` (the default) picks per hop: ``cuda-ipc`` between stages on the same GPU,
``nccl`` between CUDA stages on different GPUs, the object store otherwise. The choice needs the
GPU each actor was given, so it is made once the actors are up and before the first microbatch;
each direct hop is then tried with a small tensor, and a hop whose transport fails there falls back
to the object store with the reason (reported at the start and in summary.json); a group that does
not form within GROUP_TIMEOUT_S counts as failed, and the actors are then made anew. A transport
asked for by name is not replaced: a hop it cannot serve is refused (ConfigError, exit 2) before
any actor starts where the devices say so, and its failure on the probe stops the run.

The last stage's predictions always go to the driver through the object store: the driver is no
member of a collective group and needs them in host memory anyway.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from forwardflow.pipeline.device import TRANSPORT_DEVICES
from forwardflow.pipeline.validation import ConfigError

OBJECT_STORE = "object-store"
RAY_NAMES = {"gloo": "gloo", "nccl": "nccl", "cuda-ipc": "cuda_ipc"}  # RDT transports: ours -> Ray's
DIRECT = tuple(RAY_NAMES)
COLLECTIVE = ("gloo", "nccl")  # need a collective group of the actors
PROBE_TIMEOUT_S = 120
# Ray's create_collective_group waits for every member without a limit, and a group whose members
# cannot reach each other (a firewall between nodes, a wedged NCCL) never forms: past this, the
# hop is given up instead of the run hanging at its start.
GROUP_TIMEOUT_S = 120


@dataclass(frozen=True)
class HandOff:
    """How stage s hands its outputs to stage s + 1, and why that way."""

    transport: str  # OBJECT_STORE or one of DIRECT
    reason: str

    @property
    def direct(self) -> bool:
        return self.transport in DIRECT

    @property
    def ray_name(self) -> str | None:
        return RAY_NAMES.get(self.transport)


def check_transport(requested: str, devices: list[str]) -> None:
    """Before any actor starts: a transport asked for by name must suit every hop's devices
    (``devices``: each stage's, "cpu" or "cuda", from the placement plan)."""
    if requested not in TRANSPORT_DEVICES or len(devices) < 2:
        return
    wanted, tensors = TRANSPORT_DEVICES[requested]
    for stage, device in enumerate(devices):
        if not device.startswith(wanted):
            raise ConfigError(
                "--transport",
                f"{requested} carries {tensors}, but stage {stage} runs on {device}; use auto or object-store",
            )


def may_go_direct(requested: str, devices: list[str]) -> bool:
    """Whether any hop could use RDT, so that the actors must be created with it enabled (Ray fixes
    that per actor class, before the GPU each actor gets is known)."""
    if requested in DIRECT:
        return len(devices) > 1
    if requested == "auto":
        return any(a.startswith("cuda") and b.startswith("cuda") for a, b in itertools.pairwise(devices))
    return False


def plan_hand_offs(requested: str, locations: list[dict[str, str]]) -> list[HandOff]:
    """One HandOff per stage, from where the actors run (their ``location()``): stage s's says how
    its outputs reach stage s + 1; the last stage's, how its predictions reach the driver."""
    hand_offs = []
    for sender, receiver in itertools.pairwise(locations):
        if requested != "auto":
            reason = "asked for (--transport)"
            hand_offs.append(HandOff(requested, reason))
            continue
        both_cuda = sender["device"].startswith("cuda") and receiver["device"].startswith("cuda")
        if not both_cuda:
            hand_offs.append(HandOff(OBJECT_STORE, "a CPU stage on this hop"))
        elif sender["node_id"] == receiver["node_id"] and shared_gpu(sender, receiver):
            hand_offs.append(HandOff("cuda-ipc", "both stages on one GPU"))
        else:
            hand_offs.append(HandOff("nccl", "CUDA stages on different GPUs"))
    hand_offs.append(HandOff(OBJECT_STORE, "predictions go to the driver"))
    return hand_offs


def shared_gpu(sender: dict[str, str], receiver: dict[str, str]) -> bool:
    """Whether two actors on one node were given the same GPU (Ray's GPU ids, comma-separated)."""
    return bool(set(sender["gpus"].split(",")) & set(receiver["gpus"].split(",")) - {""})


class DirectGroups:
    """The collective groups that the hops' transports need: one per backend, over the actors of
    that backend's hops in stage order (an actor may be in one group per backend), created and
    destroyed together."""

    def __init__(self) -> None:
        self.groups: list = []

    def create(self, actors: list, hand_offs: list[HandOff]) -> None:
        """Raises GroupTimeoutError when a group has not formed within GROUP_TIMEOUT_S; its members
        may then still be inside the set-up, where every later call to them would queue."""
        from ray.experimental import collective

        for backend in COLLECTIVE:
            members = sorted(
                {stage + side for stage, h in enumerate(hand_offs) if h.transport == backend for side in (0, 1)}
            )
            if members:
                what = f"the {backend} group of stages {', '.join(map(str, members))}"
                group = within(
                    GROUP_TIMEOUT_S, what, collective.create_collective_group, [actors[s] for s in members], backend
                )
                self.groups.append(group)

    def destroy(self) -> None:
        from ray.experimental.collective import destroy_collective_group

        for group in self.groups:
            # A group with a dead member cannot be torn down cleanly; its survivors go with it.
            with contextlib.suppress(Exception):
                destroy_collective_group(group)
        self.groups = []


class GroupTimeoutError(TimeoutError):
    """A collective group did not form in time."""


def within(timeout_s: float, what: str, create: Callable[..., Any], *args: Any) -> Any:
    """``create(*args)`` on a helper thread, its result once it returns; GroupTimeoutError if it
    has not returned in ``timeout_s``. The thread is a daemon: one left waiting on members that
    never answer ends when they are killed, and never holds up the driver's exit."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = create(*args)
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="forwardflow-collective-group", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise GroupTimeoutError(f"{what} did not form within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def probe(actors: list, hand_offs: list[HandOff]) -> list[str | None]:
    """Send a small tensor over each direct hop: None where it arrived intact, else why not."""
    refs: list[ray.ObjectRef | None] = []
    for index, hand_off in enumerate(hand_offs[:-1]):
        if not hand_off.direct:
            refs.append(None)
            continue
        sent = actors[index].probe.options(tensor_transport=hand_off.ray_name).remote()
        refs.append(actors[index + 1].received_probe.remote(sent))
    problems: list[str | None] = []
    for ref in refs:
        if ref is None:
            problems.append(None)
            continue
        try:
            problems.append(None if ray.get(ref, timeout=PROBE_TIMEOUT_S) else "the probe tensor arrived changed")
        except Exception as error:  # any failure of the transport means: do not use it
            problems.append(describe(error))
    return problems


def describe(error: BaseException) -> str:
    """One line for a failure of a transport: the error raised in the actor, where there is one."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1]}" if text else type(cause).__name__
