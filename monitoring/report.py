"""PNG plots of a run from its metrics log, for users without Grafana:

    python -m forwardflow.monitoring.report RUN_DIR [--run-id ID]

writes into RUN_DIR (where ``launch/train.py --out RUN_DIR`` kept ``metrics.jsonl``; ``--plot``
does the same at the end of the run) four images of PLOT_WIDTH x PLOT_HEIGHT pixels:
throughput.png, time_split.png, loss.png and accuracy.png. matplotlib draws them through its Agg
canvas directly (no pyplot, so no global figure state and no display needed)."""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from forwardflow.monitoring.records import EVALUATION, LOG_NAME, RunRecord, StageRecord, read_log
from forwardflow.pipeline.files import atomic_write_bytes
from forwardflow.pipeline.messages import WriteError

PLOT_WIDTH, PLOT_HEIGHT, PLOT_DPI = 1200, 800, 100
PLOT_NAMES = ("throughput.png", "time_split.png", "loss.png", "accuracy.png")


def _figure(title: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(PLOT_WIDTH / PLOT_DPI, PLOT_HEIGHT / PLOT_DPI), dpi=PLOT_DPI)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    """The PNG drawn in memory, then written whole or not at all (WriteError names the file)."""
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=PLOT_DPI)
    atomic_write_bytes(path, image.getvalue())


def _no_data(axes, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what} in the log yet", ha="center", va="center", transform=axes.transAxes)


def _stage_series(records: list[RunRecord]) -> dict[int, list[tuple[RunRecord, StageRecord]]]:
    """Per stage, (run record, stage record) for every collection that had stage statistics."""
    series: dict[int, list[tuple[RunRecord, StageRecord]]] = {}
    for record in records:
        for stage in record.stages or ():
            series.setdefault(stage.stage, []).append((record, stage))
    return series


def plot_throughput(records: list[RunRecord], path: Path) -> None:
    figure, axes = _figure("Training throughput per stage")
    drawn = False
    for index, points in sorted(_stage_series(records).items()):
        times, rates = [], []
        for (before, old), (after, new) in itertools.pairwise(points):
            interval = after.elapsed_s - before.elapsed_s
            if interval > 0:
                times.append(after.elapsed_s)
                rates.append((new.samples - old.samples) / interval)
        if times:
            axes.plot(times, rates, marker=".", label=f"stage {index} ({points[0][1].device})")
            drawn = True
    driver = [r for r in records if r.kind != EVALUATION and r.samples_per_s > 0]
    if driver:
        axes.plot(
            [r.elapsed_s for r in driver], [r.samples_per_s for r in driver], "k--", marker=".", label="run (driver)"
        )
        drawn = True
    if drawn:
        axes.legend()
    else:
        _no_data(axes, "throughput")
    axes.set_xlabel("elapsed (s)")
    axes.set_ylabel("training samples / s")
    _save(figure, path)


def plot_time_split(records: list[RunRecord], path: Path) -> None:
    figure, axes = _figure("Where each stage's time went: compute / waiting for input / handing on")
    latest = next((r.stages for r in reversed(records) if r.stages), None)
    if not latest:
        _no_data(axes, "stage statistics")
    else:
        labels = [f"stage {s.stage}\n{s.device}" for s in latest]
        totals = [max(s.compute_s + s.wait_s + s.handoff_s, 1e-12) for s in latest]
        left = [0.0] * len(latest)
        for name, field, color in (
            ("compute", "compute_s", "tab:blue"),
            ("waiting for input", "wait_s", "tab:orange"),
            ("handing on", "handoff_s", "tab:green"),
        ):
            shares = [getattr(s, field) / total for s, total in zip(latest, totals)]
            axes.barh(labels, shares, left=left, color=color, label=name)
            for row, (start, share) in enumerate(zip(left, shares)):
                if share >= 0.06:
                    axes.text(start + share / 2, row, f"{100 * share:.0f}%", ha="center", va="center", color="white")
            left = [a + b for a, b in zip(left, shares)]
        axes.set_xlim(0, 1)
        axes.invert_yaxis()
        axes.legend(loc="lower right")
    axes.set_xlabel("fraction of the stage's accounted time")
    _save(figure, path)


def plot_loss(records: list[RunRecord], path: Path) -> None:
    figure, axes = _figure("Local loss per stage")
    series = _stage_series(records)
    drawn = False
    for index, points in sorted(series.items()):
        chosen = [(r.elapsed_s, s.loss) for r, s in points if s.loss is not None]
        if chosen:
            axes.plot(*zip(*chosen), marker=".", label=f"stage {index}")
            drawn = True
    if drawn:
        axes.legend()
    else:
        _no_data(axes, "local loss")
    axes.set_xlabel("elapsed (s)")
    axes.set_ylabel("local loss (mean since the previous collection)")
    _save(figure, path)


def plot_accuracy(records: list[RunRecord], path: Path) -> None:
    evaluations = [r for r in records if r.kind == EVALUATION]
    regression = any(r.test_mse for r in evaluations)  # a real-valued target: scored by squared error
    figure, axes = _figure("Test mean squared error over time" if regression else "Accuracy over time")
    drawn = False
    for predictor in sorted({name for r in evaluations for name in (r.test_mse if regression else r.test_accuracy)}):
        tests = [
            (r.elapsed_s, (r.test_mse if regression else r.test_accuracy)[predictor])
            for r in evaluations
            if predictor in (r.test_mse if regression else r.test_accuracy)
        ]
        axes.plot(*zip(*tests), marker="o", linewidth=2, label=f"test ({predictor})")
        drawn = True
    if regression:
        axes.legend()
        axes.set_xlabel("elapsed (s)")
        axes.set_ylabel("mean squared error")
        _save(figure, path)
        return
    for index, points in sorted(_stage_series(records).items()):
        chosen = [(r.elapsed_s, s.train_accuracy) for r, s in points if s.train_accuracy is not None]
        if chosen:
            axes.plot(*zip(*chosen), alpha=0.6, linewidth=1, label=f"stage {index} train (own targets)")
            drawn = True
    if drawn:
        axes.set_ylim(-0.02, 1.02)  # a margin: lines at 0 or 1 (an easy set) would hide in the frame
        axes.legend()
    else:
        _no_data(axes, "accuracy")
    axes.set_xlabel("elapsed (s)")
    axes.set_ylabel("accuracy")
    _save(figure, path)


def write_plots(run_dir: Path, run_id: str | None = None) -> list[Path]:
    """Draw the four plots of ``run_id`` (default: the log's last run) into ``run_dir``."""
    log = Path(run_dir) / LOG_NAME
    if not log.is_file():
        raise FileNotFoundError(f"{log} does not exist: run launch/train.py with --out {run_dir}")
    records = read_log(log, run_id)
    if not records:
        raise ValueError(f"{log} holds no records" + (f" of run {run_id}" if run_id else ""))
    paths = []
    for name, plot in zip(PLOT_NAMES, (plot_throughput, plot_time_split, plot_loss, plot_accuracy)):
        path = Path(run_dir) / name
        plot(records, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forwardflow.monitoring.report", description="Write PNG plots of a run from its metrics.jsonl."
    )
    parser.add_argument("run_dir", help="the run's --out directory")
    parser.add_argument("--run-id", help="which run of the log (default: the last one)")
    args = parser.parse_args(argv)
    try:
        paths = write_plots(Path(args.run_dir), args.run_id)
    except (FileNotFoundError, ValueError) as error:
        print(f"forwardflow: error: {error}", file=sys.stderr)
        return 2
    except WriteError as error:  # a full disk, a read-only folder
        print(f"forwardflow: error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
