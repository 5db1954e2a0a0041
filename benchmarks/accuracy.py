"""Accuracy of every learning rule on every dataset: same data, same net, same pipeline, one flag
apart, with backprop beside them.

    python -m benchmarks.accuracy                  # the CPU budget (fits a 2-core machine)
    python -m benchmarks.accuracy --full           # the GPU budget: 20 epochs x 3 seeds, VGG on CIFAR-10
    python -m benchmarks.accuracy --rules sigprop bp --datasets mnist --seeds 2 --epochs 5

Writes ``benchmarks/results/accuracy.md`` (the table), ``accuracy.json`` (every run, epoch by
epoch) and ``accuracy_vs_epochs.png``.

Runs use the sequential runner by default: the stages of a run are the same Stage objects as in
the Ray pipeline (bit-identical results, tested), and on a 2-core CPU one process with 2 torch
threads is the fastest way to train them; ``--executor ray`` runs them as actors instead, which
also reports the peak memory of each stage's own process.

CIFAR-10 is read from ``--cifar``: a tarball or folder of the image-folder layout
(``train/<class>/*.jpg``, ``test/<class>/*.jpg``), or the standard python batches. The JPEG copy
kept beside the project (``../shared/datasets/cifar10-jpeg75.tar.gz``) is the default. An archive
is extracted into ``.data-cache/`` once, and images are decoded once into python batches there
(shuffled with a fixed seed, since the folders are sorted by class and ``--train-limit`` takes the
first samples).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import statistics
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common import machine, today
from forwardflow.launch.build import build_run
from forwardflow.pipeline.config import RunConfig
from forwardflow.pipeline.data import REPO_ROOT, load_image_folder
from forwardflow.pipeline.presets import cifar_vgg, cifar_vgg_small, fashion_fc, mnist_fc, with_rule
from forwardflow.pipeline.rules.base import Predictor
from forwardflow.pipeline.rules.registry import RULES
from forwardflow.pipeline.training import EvalResult, RunObserver

RESULTS = Path(__file__).parent / "results"
CACHE = REPO_ROOT / ".data-cache"
DEFAULT_CIFAR = REPO_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg75.tar.gz"
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


@dataclass(frozen=True)
class Budget:
    """How long each dataset trains and on how much of it."""

    name: str
    epochs: dict[str, int]
    seeds: int
    train_limit: dict[str, int]  # 0: all
    test_limit: dict[str, int]
    cifar_full_net: bool  # the VGG of the cifar-vgg preset, else the small one


CPU_BUDGET = Budget(
    "CPU budget",
    epochs={"mnist": 4, "fashion-mnist": 4, "cifar10": 3},
    seeds=1,
    train_limit={"cifar10": 10_000},
    test_limit={"cifar10": 2_000},
    cifar_full_net=False,
)
GPU_BUDGET = Budget(
    "full budget",
    epochs={"mnist": 20, "fashion-mnist": 20, "cifar10": 100},
    seeds=3,
    train_limit={},
    test_limit={},
    cifar_full_net=True,
)


# ---------------------------------------------------------------- CIFAR-10 preparation


def _write_batches(arrays: tuple[np.ndarray, ...], out: Path) -> None:
    """The standard python batches (5 training batches, one test batch), as users have them."""
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = arrays
    parts = np.array_split(np.arange(len(train_y)), 5)
    for number, part in enumerate(parts, start=1):
        with open(out / f"data_batch_{number}", "wb") as handle:
            pickle.dump({b"data": train_x[part].reshape(len(part), -1), b"labels": train_y[part].tolist()}, handle)
    with open(out / "test_batch", "wb") as handle:
        pickle.dump({b"data": test_x.reshape(len(test_y), -1), b"labels": test_y.tolist()}, handle)


def _decode_folder(folder: Path) -> tuple[np.ndarray, ...]:
    """The image folder's arrays, each split shuffled with a fixed seed: the folders are sorted by
    class, and ``--train-limit`` takes the first N."""
    generator = np.random.default_rng(0)
    train_x, train_y, test_x, test_y = load_image_folder(folder)
    train_order, test_order = generator.permutation(len(train_y)), generator.permutation(len(test_y))
    return train_x[train_order], train_y[train_order], test_x[test_order], test_y[test_order]


def prepare_cifar(source: Path) -> Path:
    """A folder of CIFAR-10 python batches made from ``source`` (decoded once, then reused)."""
    if source.is_dir() and (source / "test_batch").is_file():
        return source
    stem = source.name.split(".")[0]
    batches = CACHE / f"{stem}-batches"
    if (batches / "test_batch").is_file():
        return batches
    folder = source
    if source.is_file():
        folder = CACHE / stem
        if not (folder / "test").is_dir():
            print(f"accuracy: extracting {source} into {folder}", file=sys.stderr)
            folder.mkdir(parents=True, exist_ok=True)
            with tarfile.open(source) as archive:
                archive.extractall(folder, filter="data")
        inner = [p for p in folder.iterdir() if p.is_dir() and (p / "test").is_dir()]
        folder = folder if (folder / "test").is_dir() else inner[0]
    print(f"accuracy: decoding {folder} once into {batches}", file=sys.stderr)
    train_x, train_y, test_x, test_y = _decode_folder(folder)
    _write_batches((train_x, train_y, test_x, test_y), batches)
    return batches


# ---------------------------------------------------------------- runs


def base_config(dataset: str, budget: Budget, cifar_dir: Path | None) -> RunConfig:
    if dataset == "mnist":
        config = mnist_fc()
    elif dataset == "fashion-mnist":
        config = fashion_fc()
    else:
        config = cifar_vgg() if budget.cifar_full_net else cifar_vgg_small()
        config = replace(config, data=replace(config.data, data_dir=str(cifar_dir)))
    data = replace(
        config.data, train_limit=budget.train_limit.get(dataset, 0), test_limit=budget.test_limit.get(dataset, 0)
    )
    return replace(config, data=data, schedule=replace(config.schedule, epochs=budget.epochs[dataset]))


class Curve(RunObserver):
    """Test accuracy after every epoch, by prediction label (the rule's own first)."""

    def __init__(self, label: str, predictors: tuple[Predictor, ...]):
        self.label = label
        self.labels = {p.key: p.label for p in predictors}
        self.points: list[dict] = []

    def on_evaluation(self, result: EvalResult, progress) -> None:
        accuracies = {self.labels[key]: value for key, value in result.accuracies.items()}
        self.points.append({"epoch": result.epoch + 1, "wall_s": round(result.wall_s, 2), "accuracies": accuracies})
        print(
            f"  {self.label} epoch {result.epoch + 1}: {100 * result.accuracy:.2f}% {accuracies} "
            f"({result.wall_s:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def run_one(config: RunConfig, label: str) -> dict:
    """One run; called in a fresh process, so that its peak memory is its own."""
    run = build_run(config)
    curve = Curve(label, run.predictors)
    run.extra_observers.append(curve)
    with run:
        result = run.train()
    return {
        "dataset": config.data.dataset,
        "rule": config.rule.name,
        "seed": config.seed,
        "model": config.model.name,
        "stages": len(run.setups),
        "epochs": config.schedule.epochs,
        "batch_size": config.schedule.batch_size,
        "lr": config.optim.lr,
        "devices": run.devices,
        "executor": config.execution.executor,
        "primary": run.predictors[0].label,
        "accuracy": curve.points[-1]["accuracies"],
        "curve": curve.points,
        "wall_s": result.wall_s,
        "samples_per_s": result.train_samples_per_s,
        "peak_memory_mib": [round(s.peak_memory_bytes / 2**20) for s in result.stages],
        "train_samples": len(run.dataset.train_y),
        "test_samples": len(run.dataset.test_y),
    }


# ---------------------------------------------------------------- report


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}%"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}%"


def _memory(runs: list[dict]) -> str:
    peaks = runs[0]["peak_memory_mib"]
    if runs[0]["executor"] == "sequential":
        return f"{max(peaks):,} (one process)"
    return " / ".join(f"{p:,}" for p in peaks)


def table(runs: list[dict], budget: Budget, command: str) -> str:
    lines = [
        f"# Accuracy: every rule, same data, same net, same pipeline ({today()})",
        "",
        f"Machine: {machine()}. Budget: {budget.name}. Command: `{command}`.",
        "",
        "Test accuracy after the last epoch (mean ± std over seeds when there are several), from each "
        "rule's own prediction: sigprop the nearest class target, ff label scanning (goodness summed "
        "over the stages after the first), local the last stage's local classifier, efp and bp the "
        "output layer. Other predictions of the same runs in the last column. Samples/s: training "
        "samples per second of wall time, evaluation included. Peak memory: peak resident set of the "
        "run's own process (all stages share it in the sequential runner; per stage with `--executor ray`).",
        "",
        "| dataset | rule | model, stages | test accuracy | epochs | seeds | wall s | samples/s "
        "| peak memory MiB | other predictions |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["rule"]), []).append(run)
    for (dataset, rule), group in groups.items():
        first = group[0]
        primary = first["primary"]
        others = [name for name in first["accuracy"] if name != primary]
        other_text = ", ".join(f"{name} {_mean_std([r['accuracy'][name] for r in group])}" for name in others)
        subset = f" ({first['train_samples']:,} train / {first['test_samples']:,} test)" if dataset == "cifar10" else ""
        lines.append(
            f"| {DATASET_NAMES[dataset]}{subset} | {rule} | {first['model']}, {first['stages']} "
            f"| {_mean_std([r['accuracy'][primary] for r in group])} | {first['epochs']} | {len(group)} "
            f"| {statistics.mean(r['wall_s'] for r in group):,.0f} "
            f"| {statistics.mean(r['samples_per_s'] for r in group):,.0f} | {_memory(group)} | {other_text} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(run["dataset"] for run in runs))
    figure, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        rules = list(dict.fromkeys(run["rule"] for run in runs if run["dataset"] == dataset))
        for rule in rules:
            group = [run for run in runs if run["dataset"] == dataset and run["rule"] == rule]
            primary = group[0]["primary"]
            epochs = [point["epoch"] for point in group[0]["curve"]]
            values = [
                100 * statistics.mean(run["curve"][i]["accuracies"][primary] for run in group)
                for i in range(len(epochs))
            ]
            axis.plot(epochs, values, marker="o", label=rule)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_title(DATASET_NAMES[dataset])
        axis.set_xlabel("epoch")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the GPU budget (20 epochs, 3 seeds, VGG on CIFAR-10)")
    # The rules that learn through time need sequence data: benchmarks/temporal.py compares them.
    image_rules = [name for name, rule in RULES.items() if rule.time_handling != "through-time"]
    parser.add_argument("--rules", nargs="+", default=image_rules, choices=image_rules)
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES), choices=list(DATASET_NAMES))
    parser.add_argument("--seeds", type=int, help="seeds per rule and dataset (default: the budget's)")
    parser.add_argument("--epochs", type=int, help="epochs for every dataset (default: the budget's)")
    parser.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="CIFAR-10 tarball or folder")
    parser.add_argument("--executor", default="sequential", choices=["sequential", "ray"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (sequential runner)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for accuracy.md, .json and .png")
    args = parser.parse_args(argv)
    budget = GPU_BUDGET if args.full else CPU_BUDGET
    if args.seeds:
        budget = replace(budget, seeds=args.seeds)
    if args.epochs:
        budget = replace(
            budget, name=f"{budget.name}, {args.epochs} epochs", epochs={name: args.epochs for name in budget.epochs}
        )
    cifar_dir = None
    if "cifar10" in args.datasets:
        source = Path(args.cifar)
        if not source.exists():
            sys.exit(f"accuracy: no CIFAR-10 at {source}; pass --cifar or leave cifar10 out of --datasets")
        cifar_dir = prepare_cifar(source)
    runs: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spawn = multiprocessing.get_context("spawn")
    for dataset_name in args.datasets:
        base = base_config(dataset_name, budget, cifar_dir)
        for rule in args.rules:
            for seed in range(budget.seeds):
                config = with_rule(base, rule)
                config = replace(
                    config,
                    seed=seed,
                    monitoring=replace(config.monitoring, progress=False),
                    execution=replace(
                        config.execution, executor=args.executor, device=args.device, threads=args.threads
                    ),
                )
                label = f"{dataset_name} {rule} seed {seed}"
                print(
                    f"accuracy: {label} ({config.model.name}, {config.schedule.epochs} epochs)",
                    file=sys.stderr,
                    flush=True,
                )
                started = time.perf_counter()
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process per run
                    runs.append(pool.submit(run_one, config, label).result())
                print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
                (out / "accuracy.json").write_text(json.dumps(runs, indent=1) + "\n")  # keep partial results
    command = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "accuracy.md").write_text(table(runs, budget, command.strip()))
    plot(runs, out / "accuracy_vs_epochs.png")
    print((out / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
