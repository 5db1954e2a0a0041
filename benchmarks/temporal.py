"""Temporal credit assignment: Signal Propagation through time against backpropagation through time,
TBPTT(k1, k2) and real-time recurrent learning, on the same recurrent nets through the same pipeline.

    python -m benchmarks.temporal                  # the full budget (for an idle machine)
    python -m benchmarks.temporal --small          # minutes: every part on a little data
    python -m benchmarks.temporal --parts memory   # accuracy, memory, adding: any of them

Parts:

- accuracy: MNIST by rows (preset ``mnist-rows``: 28 steps of 28 pixels, two GRU layers of 128) at
  equal epochs for Signal Propagation (sigprop), local heads, BPTT, TBPTT(1, 28), TBPTT(k, k) for a
  few k, and RTRL on a small net (one GRU layer of 16, with BPTT on that net beside it). With the
  time to first update: the time step of its sequence at which every stage had updated once, and
  the seconds from the run's first microbatch until then.
- memory: per-stage peak memory against the sequence length T (28, 112, 392, 784) on the adding
  problem, for sigprop, BPTT and TBPTT(k, k) with k = 28 and 112: each configuration runs a few
  training batches on the Ray executor (each stage in an actor process of its own; on a CPU the
  figure is that process's peak resident memory, on a GPU the stage's peak CUDA allocation). Drawn
  in temporal_memory.png.
- adding: the adding problem at T = 100 (preset ``adding``): the test mean squared error each rule
  reaches, against always predicting 1.0 (0.167).

Every configuration runs in a fresh process. Writes ``benchmarks/results/temporal.md`` (tables,
with the command, date and machine), ``temporal.json`` (every run) and ``temporal_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.common import machine, today
from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.pipeline.presets import rnn_model

RESULTS = Path(__file__).parent / "results"
SMALL_NET = rnn_model((16,), name="gru-16")  # small enough for RTRL's influence matrix
MEMORY_LENGTHS = (28, 112, 392, 784)
ADDING_BASELINE = 1 / 6  # the MSE of always predicting 1.0


@dataclass(frozen=True)
class Variant:
    label: str
    flags: tuple[str, ...]  # after --preset
    small_net: bool = False  # the model of SMALL_NET instead of the preset's


@dataclass(frozen=True)
class Budget:
    name: str
    rows: tuple[str, ...]  # flags for the accuracy part
    adding: tuple[str, ...]
    memory: tuple[str, ...]


FULL = Budget(
    "full budget",
    rows=("--epochs", "5"),
    adding=("--epochs", "10"),
    memory=("--train-limit", "128", "--test-limit", "64"),
)
SMALL = Budget(
    "small budget",
    rows=("--epochs", "1", "--train-limit", "2000", "--test-limit", "500"),
    adding=("--epochs", "1", "--train-limit", "1000", "--test-limit", "200"),
    memory=("--train-limit", "64", "--test-limit", "16"),
)

ACCURACY_VARIANTS = (
    Variant("sigprop", ("--rule", "sigprop")),
    Variant("local heads", ("--rule", "local")),
    Variant("BPTT", ("--rule", "bptt")),
    Variant("TBPTT(1, 28)", ("--rule", "tbptt", "--k1", "1", "--k2", "28")),
    Variant("TBPTT(4, 4)", ("--rule", "tbptt", "--k1", "4", "--k2", "4")),
    Variant("TBPTT(7, 7)", ("--rule", "tbptt", "--k1", "7", "--k2", "7")),
    Variant("TBPTT(14, 14)", ("--rule", "tbptt", "--k1", "14", "--k2", "14")),
    Variant("RTRL (small net)", ("--rule", "rtrl"), small_net=True),
    Variant("BPTT (small net)", ("--rule", "bptt"), small_net=True),
)
ADDING_VARIANTS = (
    Variant("sigprop", ("--rule", "sigprop")),
    Variant("local heads", ("--rule", "local")),
    Variant("BPTT", ("--rule", "bptt")),
    Variant("TBPTT(10, 10)", ("--rule", "tbptt", "--k1", "10", "--k2", "10")),
    Variant("TBPTT(50, 50)", ("--rule", "tbptt", "--k1", "50", "--k2", "50")),
    Variant("RTRL (small net)", ("--rule", "rtrl"), small_net=True),
    Variant("BPTT (small net)", ("--rule", "bptt"), small_net=True),
)
MEMORY_VARIANTS = (
    Variant("sigprop", ("--rule", "sigprop")),
    Variant("BPTT", ("--rule", "bptt")),
    Variant("TBPTT(28, 28)", ("--rule", "tbptt", "--k1", "28", "--k2", "28")),
    Variant("TBPTT(112, 112)", ("--rule", "tbptt", "--k1", "112", "--k2", "112")),
)


def command(preset: str, variant: Variant, extra: tuple[str, ...]) -> list[str]:
    return ["--preset", preset, *variant.flags, *extra]


def run_one(argv: list[str], small_net: bool) -> dict:
    """One run through the builder (in a fresh process): its scores and every stage's figures."""
    config = parse_config(argv + ["--no-progress"])
    if small_net:
        config = replace(config, model=SMALL_NET)
    with build_run(config) as run:
        result = run.train()
        metric = run.dataset.target_spec.metric
    stages = result.stages
    started = min(s.first_step_at for s in stages)
    updated = [s for s in stages if s.first_update_at]
    return {
        "argv": argv,
        "model": config.model.name,
        "rule": config.rule.name,
        "metric": metric.name,
        "scores": [e.score for e in result.evaluations],
        "score": result.evaluations[-1].score if result.evaluations else None,
        "final_scores": result.evaluations[-1].scores if result.evaluations else {},
        "wall_s": result.wall_s,
        "samples_per_s": result.train_samples_per_s,
        "stages": len(stages),
        "peak_memory_mib": [round(s.peak_memory_bytes / 2**20, 1) for s in stages],
        "first_update_step": max(s.first_update_step for s in updated) if len(updated) == len(stages) else None,
        "first_update_s": max(s.first_update_at for s in updated) - started if len(updated) == len(stages) else None,
        "updates": [s.updates for s in stages],
        "devices": [s.device for s in stages],
    }


def run_fresh(argv: list[str], small_net: bool = False) -> dict:
    spawn = multiprocessing.get_context("spawn")
    print(f"temporal: {' '.join(argv)}{' (small net)' if small_net else ''}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        found = pool.submit(run_one, argv, small_net).result()
    print(f"  score {found['score']} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return found


def chosen(variants: tuple[Variant, ...], names: list[str] | None) -> list[Variant]:
    return [v for v in variants if names is None or v.label in names]


def accuracy_part(budget: Budget, executor: tuple[str, ...], names: list[str] | None = None) -> list[dict]:
    return [
        {"variant": v.label, **run_fresh(command("mnist-rows", v, budget.rows + executor), v.small_net)}
        for v in chosen(ACCURACY_VARIANTS, names)
    ]


def adding_part(budget: Budget, executor: tuple[str, ...], names: list[str] | None = None) -> list[dict]:
    return [
        {"variant": v.label, **run_fresh(command("adding", v, budget.adding + executor), v.small_net)}
        for v in chosen(ADDING_VARIANTS, names)
    ]


def memory_part(budget: Budget, names: list[str] | None = None) -> list[dict]:
    runs = []
    for variant in chosen(MEMORY_VARIANTS, names):
        for length in MEMORY_LENGTHS:
            flags = ("--epochs", "1", "--sequence-length", str(length), "--executor", "ray", *budget.memory)
            runs.append({"variant": variant.label, "length": length, **run_fresh(command("adding", variant, flags))})
    return runs


# ---------------------------------------------------------------- report


def _score(run: dict) -> str:
    value = run["score"]
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if run["metric"] == "accuracy" else f"{value:.4f}"


def _first_update(run: dict) -> str:
    if run["first_update_step"] is None:
        return "-"
    return f"step {run['first_update_step']} ({run['first_update_s']:.2f} s)"


def accuracy_table(runs: list[dict]) -> list[str]:
    lines = [
        "| rule | model | test accuracy | first update (all stages) | updates per stage | samples/s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['variant']} | {run['model']} | {_score(run)} | {_first_update(run)} | "
            f"{' / '.join(f'{u:,}' for u in run['updates'])} | {run['samples_per_s']:.0f} | {run['wall_s']:.0f} |"
        )
    by_label = {run["variant"]: run for run in runs}
    if "sigprop" in by_label and "BPTT" in by_label and by_label["BPTT"]["score"] is not None:
        gap = 100 * (by_label["sigprop"]["score"] - by_label["BPTT"]["score"])
        lines += ["", f"sigprop - BPTT: {gap:+.2f} points (the target: no more than 2 points below BPTT)."]
    return lines


def adding_table(runs: list[dict]) -> list[str]:
    lines = [
        "| rule | model | test MSE (own prediction) | output head | own / 0.167 | first update | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ratio = "-" if run["score"] is None else f"{run['score'] / ADDING_BASELINE:.2f}"
        head = run["final_scores"].get("head")
        lines.append(
            f"| {run['variant']} | {run['model']} | {_score(run)} | {'-' if head is None else f'{head:.4f}'} | "
            f"{ratio} | {_first_update(run)} | {run['wall_s']:.0f} |"
        )
    return lines


def memory_table(runs: list[dict]) -> list[str]:
    variants = list(dict.fromkeys(run["variant"] for run in runs))
    lengths = sorted({run["length"] for run in runs})
    lines = [
        "| rule | " + " | ".join(f"T = {t}" for t in lengths) + " | T = 784 / T = 28 |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    for variant in variants:
        peaks = {run["length"]: max(run["peak_memory_mib"]) for run in runs if run["variant"] == variant}
        ratio = f"{peaks[784] / peaks[28]:.2f}" if 784 in peaks and 28 in peaks else "-"
        cells = " | ".join(f"{peaks[t]:,.0f}" if t in peaks else "-" for t in lengths)
        lines.append(f"| {variant} | {cells} | {ratio} |")
    return lines


def plot_memory(runs: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    axes = figure.add_subplot()
    for variant in dict.fromkeys(run["variant"] for run in runs):
        points = sorted((run["length"], max(run["peak_memory_mib"])) for run in runs if run["variant"] == variant)
        axes.plot(*zip(*points), marker="o", label=variant)
    axes.set_xticks(list(MEMORY_LENGTHS), [str(t) for t in MEMORY_LENGTHS])
    axes.set_ylim(bottom=0)  # the process's own memory (torch, Ray) sits under every line
    axes.set_xlabel("sequence length T (adding problem)")
    axes.set_ylabel("peak memory of the largest stage (MiB)")
    axes.set_title("Per-stage peak memory against sequence length")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def report(results: dict, budget: Budget, argv: list[str]) -> str:
    lines = [
        "# Temporal credit assignment",
        "",
        f"{today()}, {machine()}; {budget.name}.",
        "",
        f"Command: `{' '.join(['python -m benchmarks.temporal', *map(shlex.quote, argv)])}`",
    ]
    if "accuracy" in results:
        lines += ["", f"## MNIST by rows at equal epochs ({' '.join(budget.rows)})", ""]
        lines += accuracy_table(results["accuracy"])
    if "adding" in results:
        lines += ["", f"## The adding problem, T = 100 ({' '.join(budget.adding)})", ""]
        lines += adding_table(results["adding"])
        lines += ["", "Always predicting 1.0 scores 0.167; a rule has solved the task well below it."]
    if "memory" in results:
        lines += ["", f"## Peak memory of the largest stage, MiB, against T ({' '.join(budget.memory)})", ""]
        lines += memory_table(results["memory"])
        lines += [
            "",
            "Adding problem, one GRU layer of 128, batch 64, Ray executor (a process per stage: on a CPU the "
            "figure is that process's peak resident memory, which includes the ~0.4 GiB of torch and Ray "
            "themselves). Plot: temporal_memory.png.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a little data and one epoch: checks every part runs")
    parser.add_argument("--parts", nargs="+", default=["accuracy", "adding", "memory"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the sequential runs")
    parser.add_argument(
        "--variants", nargs="+", help="only the rows of these labels (as in the tables: sigprop, BPTT, ...)"
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for temporal.md, .json and .png")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    for part in args.parts:
        if part not in ("accuracy", "adding", "memory"):
            parser.error(f"--parts: {part!r} is not one of accuracy, adding, memory")
    labels = {v.label for v in (*ACCURACY_VARIANTS, *ADDING_VARIANTS, *MEMORY_VARIANTS)}
    for name in args.variants or ():
        if name not in labels:
            parser.error(f"--variants: {name!r} is not one of {', '.join(sorted(labels))}")
    budget = SMALL if args.small else FULL
    executor = ("--executor", "sequential", "--threads", str(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for part in args.parts:
        if part == "accuracy":
            results[part] = accuracy_part(budget, executor, args.variants)
        elif part == "adding":
            results[part] = adding_part(budget, executor, args.variants)
        else:
            results[part] = memory_part(budget, args.variants)
        (out / "temporal.json").write_text(json.dumps(results, indent=1) + "\n")  # keep partial results
    if "memory" in results:
        plot_memory(results["memory"], out / "temporal_memory.png")
    (out / "temporal.md").write_text(report(results, budget, given))
    print((out / "temporal.md").read_text())


if __name__ == "__main__":
    main()
