"""forwardflow's Ray pipeline beside PyTorch's own pipeline parallelism: the same net, split into the
same stages, trained with backprop through torch.distributed.pipelining (ScheduleGPipe and
Schedule1F1B, one process per stage), at the same microbatch size, on the same machine.

    python -m benchmarks.peer                 # writes benchmarks/results/peer.md
    python -m benchmarks.peer --quick         # small budgets (a check that it runs)

Reported per configuration: training samples/s, the bubble fraction of each stage (the share of
the training time it was not computing), its peak of saved activations (the tensors autograd keeps
for the backward pass, counted through saved-tensor hooks, parameters excluded) and its peak
resident memory, and test accuracy after the same epochs. forwardflow runs launch/train.py in a
fresh process (Signal Propagation, --threads 1); its saved activations are measured by running
its stages in this process, and its queued inputs (at most --window microbatches per stage, in
Ray's object store) are shown beside them. PyTorch runs on gloo here (NCCL with --device cuda), one
torch thread per process, the batch split into --microbatches microbatches; its learning rate and
cosine schedule are forwardflow's, over its own optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.common import load_line, machine, today, write_report
from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.pipeline.config import RunConfig
from forwardflow.pipeline.data import load_dataset
from forwardflow.pipeline.messages import Microbatch
from forwardflow.pipeline.model import build_stage_blocks, plan_stages
from forwardflow.pipeline.profiling import SavedActivations
from forwardflow.pipeline.stage import Stage

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
SCHEDULES = ("gpipe", "1f1b")


def forwardflow_row(flags: list[str]) -> str:
    """A forwardflow row's name: Signal Propagation and the flags it adds ("--loss-at layer")."""
    return "forwardflow (" + ", ".join(["sigprop", *flags]) + ")"


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- PyTorch's pipeline, one process per stage


@dataclass
class PeerArgs:
    argv: list[str]  # forwardflow flags for the same data, net and stages
    schedule: str
    microbatches: int
    device: str
    port: int
    out: str


def stage_module(config: RunConfig, input_shape: tuple[int, ...], num_classes: int, rank: int, world: int) -> nn.Module:
    """Stage ``rank`` of the net, cut where forwardflow cuts it; the last adds the output layer."""
    spec = plan_stages(config.model, input_shape, world)[rank]
    module = nn.Sequential(*build_stage_blocks(spec))
    if rank == world - 1:
        module.append(nn.Linear(math.prod(spec.output_shape), num_classes))
    return module


def peer_rank(rank: int, world: int, args: PeerArgs) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    config = parse_config(args.argv)
    data = load_dataset(config.data, config.seed)
    torch.manual_seed(config.seed * 1000 + rank)
    module = stage_module(config, data.input_shape, data.num_classes, rank, world).to(device)
    stage = PipelineStage(module, rank, world, device)
    kind = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
    schedule = kind(stage, n_microbatches=args.microbatches, loss_fn=nn.functional.cross_entropy)
    saved = SavedActivations(list(module.parameters()))
    busy = [0.0]

    def timed(method):
        def run(*a, **k):
            started = time.perf_counter()
            with saved.hooks():
                result = method(*a, **k)
            if cuda:
                torch.cuda.synchronize(device)
            busy[0] += time.perf_counter() - started
            return result

        return run

    stage.forward_one_chunk = timed(stage.forward_one_chunk)  # type: ignore[method-assign]
    stage.backward_one_chunk = timed(stage.backward_one_chunk)  # type: ignore[method-assign]
    batch = config.schedule.batch_size * args.microbatches
    samples = len(data.train_y)
    steps_per_epoch = samples // batch
    if rank == 0:
        train_x, train_y = data.train_x, None
    elif rank == world - 1:
        train_x, train_y = None, data.train_y
    else:
        train_x = train_y = None
    del data  # each rank keeps only what it feeds in: the first the inputs, the last the labels
    total = steps_per_epoch * config.schedule.epochs
    optimizer = torch.optim.Adam(module.parameters(), lr=config.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    rss_before = rss_bytes()
    dist.barrier()
    started = time.perf_counter()
    for epoch in range(config.schedule.epochs):
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(config.seed + epoch))
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            if train_x is not None:
                schedule.step(train_x[index].to(device))
            elif train_y is not None:
                schedule.step(target=train_y[index].to(device))
            else:
                schedule.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    wall = time.perf_counter() - started
    result = {
        "wall_s": wall,
        "samples": steps_per_epoch * batch * config.schedule.epochs,
        "busy_s": busy[0],
        "saved_peak_bytes": saved.peak,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes(),
    }
    torch.save({"result": result, "state": module.cpu().state_dict()}, Path(args.out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_peer(argv: list[str], schedule: str, stages: int, microbatches: int, device: str) -> dict:
    config = parse_config(argv)
    with tempfile.TemporaryDirectory() as out:
        args = PeerArgs(argv, schedule, microbatches, device, free_port(), out)
        mp.spawn(peer_rank, args=(stages, args), nprocs=stages, join=True)
        parts = [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(stages)]
    data = load_dataset(config.data, config.seed)
    modules = [stage_module(config, data.input_shape, data.num_classes, r, stages) for r in range(stages)]
    for module, part in zip(modules, parts):
        module.load_state_dict(part["state"])
    net = nn.Sequential(*modules).eval()
    with torch.no_grad():
        predicted = torch.cat([net(x).argmax(1) for x in data.test_x.split(1000)])
    results = [part["result"] for part in parts]
    wall = max(r["wall_s"] for r in results)
    return {
        "samples_per_s": results[0]["samples"] / wall,
        "bubble": [1 - r["busy_s"] / wall for r in results],
        "saved_mib": [r["saved_peak_bytes"] / 2**20 for r in results],
        "queued_mib": [0.0] * stages,  # what a stage has received is in its saved activations
        "rss_mib": [r["peak_rss_bytes"] / 2**20 for r in results],
        "accuracy": float((predicted == data.test_y).float().mean()),
    }


# ---------------------------------------------------------------- forwardflow


def forwardflow_saved_activations(argv: list[str], steps: int = 3) -> tuple[list[float], list[float]]:
    """Peak saved activations (MiB) of each forwardflow stage over a few training microbatches (its
    stages run in this process), and the most its queue holds: --window input microbatches."""
    run = build_run(parse_config(argv))
    window = run.config.execution.pipeline_window if run.calls is None else run.calls.window
    stages = [Stage(setup, "cpu") for setup in run.setups]
    meters = [SavedActivations([p for m in (s.blocks, s.rule) for p in m.parameters()]) for s in stages]
    queued = [0.0] * len(stages)
    for count, first in enumerate(run.schedule.microbatches()):
        if count >= steps:
            break
        mb: Microbatch = first
        for index, (stage, meter) in enumerate(zip(stages, meters)):
            size = sum(t.numel() * t.element_size() for t in (mb.inputs, mb.targets, mb.context) if t is not None)
            queued[index] = window * size / 2**20
            with meter.hooks():
                result = stage.step(mb)
            if not isinstance(result, Microbatch):
                break
            mb = result
    return [meter.peak / 2**20 for meter in meters], queued


def run_forwardflow(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "launch/train.py", "--no-progress", "--threads", "1", *argv, "--out", out]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"forwardflow {' '.join(argv)} failed: {done.stderr[-2000:]}")
        summary = json.loads((Path(out) / "summary.json").read_text())
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "bubble": [1 - s["busy_fraction"] for s in summary["stages"]],
        "rss_mib": [s["peak_memory_bytes"] / 2**20 for s in summary["stages"]],
        "accuracy": summary["test_accuracy"],
    }


# ---------------------------------------------------------------- the comparison


@dataclass
class Row:
    stages: int
    name: str
    runs: list[dict] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(run[key] for run in self.runs)

    def per_stage(self, key: str) -> list[float]:
        return [statistics.median(values) for values in zip(*(run[key] for run in self.runs))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", default="mnist-fc4")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch-size", type=int, default=512, help="the microbatch, in both")
    parser.add_argument("--microbatches", type=int, default=8, help="PyTorch: microbatches per optimizer step")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--device", default="cpu", help="cuda: NCCL, one GPU per stage (forwardflow: --device cuda)")
    parser.add_argument("--quick", action="store_true", help="small budgets")
    parser.add_argument("--out", default=str(RESULTS / "peer.md"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and torch.cuda.device_count() < max(args.stages):
        # NCCL takes one rank per GPU: PyTorch's pipeline cannot put two of its stages on one GPU.
        count = torch.cuda.device_count()
        print(
            f"benchmarks.peer: error: --device {args.device}: PyTorch's pipeline over NCCL needs a GPU per stage "
            f"({max(args.stages)} stages asked for, {count} GPU{'' if count == 1 else 's'} here)",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.quick:
        args.train_limit, args.rounds = args.train_limit or 8192, 1
    rows: list[Row] = []
    for stages in args.stages:
        argv = ["--preset", args.preset, "--stages", str(stages), "--batch-size", str(args.batch_size)]
        argv += ["--epochs", str(args.epochs), "--train-limit", str(args.train_limit), "--device", args.device]
        # forwardflow's own rows: a loss per stage, (where a stage has several layers) a loss per
        # layer, which learns as one layer per stage would, and the leaner of the two again with
        # --recompute (less kept for the backward pass, the same numbers, more compute).
        flag_sets: list[list[str]] = [[]]
        if stages < parse_config(argv).model.num_layers:
            flag_sets.append(["--loss-at layer"])
        flag_sets.append(flag_sets[-1] + ["--recompute"])
        variants = {forwardflow_row(flags): argv + " ".join(flags).split() for flags in flag_sets}
        saved = {name: forwardflow_saved_activations(variant) for name, variant in variants.items()}
        group = [Row(stages, name) for name in variants] + [Row(stages, name) for name in SCHEDULES]
        for _ in range(args.rounds):
            for row in group:
                if row.name in SCHEDULES:
                    row.runs.append(run_peer(argv, row.name, stages, args.microbatches, args.device))
                else:
                    activations, queued = saved[row.name]
                    figures = {"saved_mib": activations, "queued_mib": queued}
                    row.runs.append(run_forwardflow(variants[row.name] + ["--test-limit", "500"]) | figures)
                print(stages, row.name, json.dumps(row.runs[-1]), flush=True)
        rows += group
    write_results(Path(args.out), args, rows)


def _list(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def write_results(path: Path, args, rows: list[Row]) -> None:
    command = "python -m benchmarks.peer" + (" --quick" if args.quick else "")
    lines = [
        f"# forwardflow beside torch.distributed.pipelining ({today()}, {machine()})",
        "",
        f"Command: `{command}`. Net `--preset {args.preset}`, microbatch {args.batch_size} in both, "
        f"{args.epochs} epoch(s) of {args.train_limit or 'all'} MNIST training samples, {args.rounds} interleaved "
        f"round(s), medians. PyTorch: backprop, {args.microbatches} microbatches per optimizer step, "
        f"{'NCCL' if args.device.startswith('cuda') else 'gloo'}, one process and one torch thread per stage. "
        "forwardflow: Signal Propagation, one Ray actor and one torch thread per stage. "
        "Saved activations: what autograd keeps for backward, at its peak. Queued inputs: the most a "
        "forwardflow stage's queue can hold (its window of input microbatches, in Ray's shared-memory object "
        "store; PyTorch's received inputs are inside its saved activations). Peak RSS: the whole process; "
        "PyTorch's first rank also holds the training inputs (MNIST: 188 MiB), forwardflow's driver holds "
        "them, outside the stages.",
        "",
        "| stages | run | samples/s | vs best PyTorch | bubble per stage | saved activations per stage (MiB) "
        "| queued inputs per stage (MiB) | peak RSS per stage (MiB) | test acc |",
        "|---:|---|---:|---:|---|---|---|---|---:|",
    ]
    for row in rows:
        best = max(r.median("samples_per_s") for r in rows if r.stages == row.stages and r.name in SCHEDULES)
        bubble = _list([100 * b for b in row.per_stage("bubble")], ".0f")
        lines.append(
            f"| {row.stages} | {row.name} | {row.median('samples_per_s'):,.0f} | "
            f"{row.median('samples_per_s') / best:.2f}x | {bubble} % | "
            f"{_list(row.per_stage('saved_mib'), '.1f')} | {_list(row.per_stage('queued_mib'), '.1f')} | "
            f"{_list(row.per_stage('rss_mib'), '.0f')} | "
            f"{100 * row.median('accuracy'):.2f}% |"
        )
    lines += ["", load_line()]
    write_report(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
