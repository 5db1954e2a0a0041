"""Pipelined versus sequential on one machine, and memory against run length and window.

    python -m benchmarks.throughput            # writes benchmarks/results/throughput.md

The same model and data go through (1) the sequential runner with 1 torch thread, (2) with 2
threads, and (3) the Ray pipeline with 2 stages balanced by compute, 1 thread each (and 4 stages),
at each microbatch size given (default 512 and 1024: a larger microbatch amortises Ray's
per-hop cost). At the first size the sequential runs and the 2-stage pipeline run again with
``--bf16``: bfloat16 matmuls, which a CPU stage uses where its CPU multiplies in bfloat16. Then
the Ray pipeline runs again for a longer run and a larger in-flight window to show that each
stage's peak memory stays flat.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import machine, run, today
from forwardflow.pipeline.device import cpu_computes_bfloat16

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--out", default=str(RESULTS / "throughput.md"))
    parser.add_argument("--no-memory", action="store_true", help="leave out the memory runs")
    args = parser.parse_args()
    rows = {}
    for batch_size in args.batch_size:
        common = [
            "--preset",
            "mnist-fc4",
            "--dataset",
            args.dataset,
            "--batch-size",
            str(batch_size),
            "--test-limit",
            "2000",
            "--epochs",
            str(args.epochs),
        ]
        runs = {
            "sequential, 1 thread": common + ["--executor", "sequential", "--threads", "1", "--stages", "2"],
            "sequential, 2 threads": common + ["--executor", "sequential", "--threads", "2", "--stages", "2"],
            "ray pipeline, 2 stages x 1 thread": common + ["--executor", "ray", "--threads", "1", "--stages", "2"],
            "ray pipeline, 4 stages x 1 thread": common + ["--executor", "ray", "--threads", "1", "--stages", "4"],
        }
        if batch_size == args.batch_size[0]:
            for name in ("sequential, 1 thread", "sequential, 2 threads", "ray pipeline, 2 stages x 1 thread"):
                runs[f"{name}, --bf16"] = runs[name] + ["--bf16"]
        for name, argv in runs.items():
            result = run(argv)
            rows[batch_size, name] = {
                "samples_per_s": result.train_samples_per_s,
                "wall_s": result.wall_s,
                "busy": [s.busy_s / result.wall_s for s in result.stages],
                "accuracy": result.evaluations[-1].accuracy,
            }
            print(batch_size, name, json.dumps(rows[batch_size, name]))
    memory = {}
    for epochs in () if args.no_memory else (1, 4):
        for window in (4, 16):
            argv = [
                "--preset",
                "mnist-fc4",
                "--dataset",
                args.dataset,
                "--batch-size",
                str(args.batch_size[0]),
                "--test-limit",
                "2000",
                "--epochs",
                str(epochs),
                "--window",
                str(window),
                "--stages",
                "2",
            ]
            result = run(argv)
            memory[(epochs, window)] = [s.peak_memory_bytes / 2**20 for s in result.stages]
            print("memory", epochs, window, memory[(epochs, window)])
    write_report(Path(args.out), args, rows, memory)


def write_report(path: Path, args, rows: dict, memory: dict) -> None:
    lines = [
        f"# Pipelined vs sequential ({today()}, {machine()})",
        "",
        f"Model: 4 x 1000 fully connected (preset mnist-fc4, 2 stages of nearly equal cost), "
        f"{args.dataset}, {args.epochs} epochs, rule sigprop. Command: `python -m benchmarks.throughput"
        f"{' --no-memory' if args.no_memory else ''}`. "
        "Ratios are against the sequential runs at the same microbatch size (float32). "
        "The --bf16 rows: bfloat16 autocast over the forward pass and the local losses; this CPU "
        + (
            "multiplies in bfloat16."
            if cpu_computes_bfloat16()
            else "has no bfloat16 instructions, so they run in float32."
        ),
        "",
        "| microbatch | run | samples/s | vs 1 thread | vs 2 threads | busy fraction per stage | test acc |",
        "|---:|---|---:|---:|---:|---|---:|",
    ]
    for (batch_size, name), row in rows.items():
        base = rows[batch_size, "sequential, 1 thread"]["samples_per_s"]
        two = rows[batch_size, "sequential, 2 threads"]["samples_per_s"]
        busy = ", ".join(f"{100 * b:.0f}%" for b in row["busy"])
        lines.append(
            f"| {batch_size} | {name} | {row['samples_per_s']:,.0f} | {row['samples_per_s'] / base:.2f}x | "
            f"{row['samples_per_s'] / two:.2f}x | {busy} | {100 * row['accuracy']:.2f}% |"
        )
    if memory:
        lines += [
            "",
            "Peak resident memory per stage (MiB) against run length and in-flight window "
            f"(2 stages, Ray, microbatch {args.batch_size[0]}):",
            "",
            "| epochs | window | stage peaks (MiB) |",
            "|---:|---:|---|",
        ]
        for (epochs, window), peaks in memory.items():
            lines.append(f"| {epochs} | {window} | {', '.join(f'{p:.0f}' for p in peaks)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
