"""What durability costs and how fast a run comes back: checkpoint cost per stage, and recovery
from a stage actor killed mid-run.

    python -m benchmarks.recovery             # writes benchmarks/results/recovery.md

The default run's model (MNIST, Signal Propagation, 3 x 1000 fully connected, 3 Ray actors, Adam)
checkpoints every ``--every`` training microbatches; each stage's shard is timed by the stage itself
(serialise, write, fsync, rename) and sized. Then stage 1's actor process is killed (SIGKILL, by the
pid it reports) once ``--kill-at`` microbatches are done, and the run recovers: the time from the
kill to every stage being restored (the driver noticing, the actor recreated, every stage loading
its shard), the microbatches done again, and the time until the run is back where it was. The
same run without the kill gives the baseline wall time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, today
from forwardflow.launch.build import Run, build_run
from forwardflow.launch.cli import parse_config
from forwardflow.pipeline.checkpoint import CHECKPOINTS, complete_checkpoints
from forwardflow.pipeline.messages import Prediction
from forwardflow.pipeline.training import Progress, RunObserver, RunResult

RESULTS = Path(__file__).parent / "results"


class Kill(RunObserver):
    """Kills stage ``stage``'s actor at ``at`` microbatches done; times the way back."""

    def __init__(self, run: Run, stage: int, at: int):
        self.run, self.stage, self.at = run, stage, at
        self.killed_at = self.restored_at = self.caught_up_at = None
        self.done_at_kill = self.done_after_rewind = 0

    def on_prediction(self, prediction: Prediction, progress: Progress) -> None:
        if self.killed_at is None and progress.microbatches_done == self.at:
            os.kill(int(self.run.executor.locations[self.stage]["pid"]), signal.SIGKILL)  # type: ignore[union-attr]
            self.killed_at, self.done_at_kill = time.perf_counter(), progress.microbatches_done
        elif self.restored_at is not None and self.caught_up_at is None and progress.microbatches_done >= self.at:
            self.caught_up_at = time.perf_counter()

    def on_rewind(self, progress: Progress, reason: str) -> None:
        self.restored_at, self.done_after_rewind = time.perf_counter(), progress.microbatches_done


def one_run(argv: list[str], out: Path, kill: tuple[int, int] | None) -> tuple[RunResult, list, Kill | None]:
    """The run, its checkpoints' shard entries (all kept), and the killer's timings."""
    run = build_run(parse_config([*argv, "--out", str(out)]))
    killer = Kill(run, *kill) if kill else None
    run.extra_observers += [killer] if killer else []
    with run:
        result = run.train()
    shards = [shard for _, manifest in complete_checkpoints(out / CHECKPOINTS) for shard in manifest.shards]
    return result, shards, killer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=0, help="training samples (0: all)")
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N training microbatches")
    parser.add_argument("--kill-at", type=int, default=70, help="kill stage 1 after this many microbatches")
    parser.add_argument("--preset", default="mnist-fc")
    parser.add_argument("--out", default=str(RESULTS / "recovery.md"))
    args = parser.parse_args()
    argv = ["--preset", args.preset, "--epochs", str(args.epochs), "--no-progress", "--executor", "ray"]
    argv += ["--checkpoint-every", str(args.every), "--keep-checkpoints", "1000"]
    if args.train_limit:
        argv += ["--train-limit", str(args.train_limit)]
    with tempfile.TemporaryDirectory() as folder:
        base, shards, _ = one_run(argv, Path(folder) / "base", None)
        killed, _, kill = one_run(argv, Path(folder) / "killed", (1, args.kill_at))
    assert kill is not None and kill.killed_at is not None and kill.restored_at is not None
    stages = sorted({shard["stage"] for shard in shards})
    cuts = len(shards) // len(stages)
    lines = [
        f"# Checkpoints and recovery ({today()}, {machine()})",
        "",
        f"Load average at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())} "
        "(figures from a busy machine are upper bounds).",
        "",
        f"Command: `python -m benchmarks.recovery --epochs {args.epochs} --every {args.every} "
        f"--kill-at {args.kill_at}" + (f" --train-limit {args.train_limit}" if args.train_limit else "") + "`. "
        f"Preset {args.preset} on the Ray executor, a checkpoint every {args.every} training microbatches "
        f"({cuts} in the run), each stage writing its own shard (torch.save, fsync, rename).",
        "",
        "| stage | shard MB | write ms (median) | write ms (max) |",
        "|---:|---:|---:|---:|",
    ]
    for stage in stages:
        entries = [shard for shard in shards if shard["stage"] == stage]
        times = [1000 * s["seconds"] for s in entries]
        lines.append(
            f"| {stage} | {entries[0]['size'] / 2**20:.1f} | {statistics.median(times):.0f} | {max(times):.0f} |"
        )
    caught_up = None if kill.caught_up_at is None else kill.caught_up_at - kill.killed_at
    lines += [
        "",
        "| recovery from a killed stage actor | |",
        "|---|---:|",
        f"| kill → every stage restored (detect, recreate the actor, load the shards) | "
        f"{kill.restored_at - kill.killed_at:.1f} s |",
        f"| microbatches done again (from the last checkpoint to where the run was) | "
        f"{kill.done_at_kill - kill.done_after_rewind} |",
        f"| kill → back where it was | {'-' if caught_up is None else f'{caught_up:.1f} s'} |",
        f"| run wall time without / with the kill | {base.wall_s:.1f} s / {killed.wall_s:.1f} s |",
        f"| final weights equal the undisturbed run's | {same_weights(base, killed)} |",
    ]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def same_weights(left: RunResult, right: RunResult) -> str:
    import torch

    same = all(torch.equal(a[k], b[k]) for a, b in zip(left.weights, right.weights) for k in a)
    return "yes" if same else "no"


if __name__ == "__main__":
    main()
