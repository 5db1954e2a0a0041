"""What a microbatch costs in Ray calls and copies, with no learning in the way: the designs the Ray
pipeline could use, measured on a chain of actors that only add 1 to what they receive.

    python -m benchmarks.ray_calls            # writes benchmarks/results/ray_calls.md

- driver chains every hop: the driver calls each actor with the previous actor's ObjectRef (the
  pipeline's design before; small results travel back to the driver, their owner, and out again);
- actors push downstream: the driver calls the first actor only, each actor calls the next itself
  and returns that call's reference (the driver follows the references to collect);
- several microbatches per call: the driver chains every hop, G microbatches per call;
- with ``--direct``, Ray Direct Transport (gloo, CPU): the driver chains every hop and tensors go
  actor to actor through a collective group instead of the object store. Off by default: here
  (Ray 2.60, 2 cores) ``create_collective_group`` for gloo once never returned; it is now given up
  after ``GROUP_TIMEOUT_S``, as in the pipeline (actors/transport.py).

At most ``--window`` microbatches are in flight in every design, as in the pipeline. Sizes: a
small activation (64 x 32 floats, the tiny net of benchmarks/overhead.py) and a large one (512 x
1000, the MNIST 4 x 1000 net of benchmarks/throughput.py).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import deque
from pathlib import Path

import ray
import torch

from benchmarks.common import machine, today, write_report
from forwardflow.actors.transport import GROUP_TIMEOUT_S, within

RESULTS = Path(__file__).parent / "results" / "ray_calls.md"
SIZES = {"small (64 x 32)": (64, 32), "large (512 x 1000)": (512, 1000)}


@ray.remote(max_restarts=0, max_task_retries=0)
class Hop:
    def __init__(self):
        torch.set_num_threads(1)
        self.downstream = None

    def connect(self, downstream) -> None:
        self.downstream = downstream

    def step(self, x):
        return x + 1

    def step_many(self, xs):
        return [x + 1 for x in xs]

    def push(self, x):
        y = x + 1
        if self.downstream is None:
            return y
        return [self.downstream.push.remote(y)]  # in a list: the driver gets the reference, not the value

    @ray.method(tensor_transport="gloo")
    def step_direct(self, x):
        return x + 1


def chained(actors, items, window: int, method: str = "step") -> None:
    in_flight: deque = deque()
    for item in items:
        ref = ray.put(item)
        for actor in actors:
            ref = getattr(actor, method).remote(ref)
        in_flight.append(ref)
        if len(in_flight) >= window:
            fetch(in_flight.popleft(), method)
    for ref in in_flight:
        fetch(ref, method)


def fetch(ref, method: str):
    # Ray 2.60 fetches a gloo (two-sided) RDT result into the driver only through the object store.
    return ray.get(ref, _use_object_store=True) if method == "step_direct" else ray.get(ref)


def grouped(actors, items, window: int, group: int) -> None:
    in_flight: deque = deque()
    for start in range(0, len(items), group):
        ref = ray.put(items[start : start + group])
        for actor in actors:
            ref = actor.step_many.remote(ref)
        in_flight.append(ref)
        if len(in_flight) * group >= window:
            ray.get(in_flight.popleft())
    ray.get(list(in_flight))


def pushed(actors, items, window: int) -> None:
    def collect(ref):
        value = ray.get(ref)
        while isinstance(value, list):
            value = ray.get(value[0])
        return value

    in_flight: deque = deque()
    for item in items:
        in_flight.append(actors[0].push.remote(item))
        if len(in_flight) >= window:
            collect(in_flight.popleft())
    for ref in in_flight:
        collect(ref)


def direct_group(actors):
    from ray.experimental.collective import create_collective_group

    # Given up after the pipeline's own limit, since Ray waits for a group's members without one.
    within(GROUP_TIMEOUT_S, "the gloo group of the chain", create_collective_group, actors, "gloo")


def measure(
    stages: int, count: int, window: int, group: int, direct: bool, repeats: int
) -> dict[tuple[str, str], float]:
    """Best rate of each design over ``repeats`` interleaved rounds."""
    rates: dict[tuple[str, str], float] = {}
    for _ in range(repeats):
        for key, rate in measure_once(stages, count, window, group, direct).items():
            rates[key] = max(rate, rates.get(key, 0.0))
    return rates


def measure_once(stages: int, count: int, window: int, group: int, direct: bool) -> dict[tuple[str, str], float]:
    rates = {}
    for size_name, shape in SIZES.items():
        items = [torch.randn(*shape).numpy() for _ in range(count)]
        tensors = [torch.randn(*shape) for _ in range(count)]
        designs = {
            "driver chains every hop": lambda actors, items=items: chained(actors, items, window),
            "actors push downstream": lambda actors, items=items: pushed(actors, items, window),
            f"{group} microbatches per call": lambda actors, items=items: grouped(actors, items, window, group),
        }
        if direct:
            designs["Ray Direct Transport (gloo)"] = lambda actors, tensors=tensors: chained(
                actors, tensors, window, "step_direct"
            )
        for design, run in designs.items():
            actors = [Hop.remote() for _ in range(stages)]  # type: ignore[attr-defined]
            for upstream, downstream in itertools.pairwise(actors):
                upstream.connect.remote(downstream)
            if "gloo" in design:
                direct_group(actors)
            ray.get([actor.step.remote(0) for actor in actors])  # started
            run(actors)  # warm-up
            started = time.perf_counter()
            run(actors)
            rates[size_name, design] = count / (time.perf_counter() - started)
            print(f"{size_name}, {design}: {rates[size_name, design]:,.0f} microbatches/s", file=sys.stderr)
            for actor in actors:
                ray.kill(actor)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best rate counts")
    parser.add_argument("--direct", action="store_true", help="also Ray Direct Transport (gloo)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        rates = measure(args.stages, args.count, args.window, args.group, args.direct, args.repeats)
    finally:
        if started_ray:
            ray.shutdown()
    command = "python -m benchmarks.ray_calls " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Ray calls and copies per microbatch",
        "",
        f"Date: {today()}. Machine: {machine()}; Ray {ray.__version__}. Command: `{command.strip()}`",
        "",
        f"A chain of {args.stages} actors that add 1, {args.count} microbatches, at most {args.window} in flight; "
        f"best of {args.repeats} interleaved rounds.",
        "",
        "| activation | design | microbatches/s |",
        "|---|---|---:|",
    ]
    lines += [f"| {size} | {design} | {rate:,.0f} |" for (size, design), rate in rates.items()]
    text = "\n".join(lines) + "\n"
    write_report(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
