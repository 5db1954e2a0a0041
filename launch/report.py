"""The end of a run: the summary (``summary.json`` in ``--out``) and the result table on the terminal.
Which predictions a run reports, how they are labelled and which one is its test score come from
the rule (``Rule.predictors``); the score itself (accuracy, or mean squared error) from the task
(``pipeline.targets.Metric``): the summary's keys are ``test_<metric>`` and ``test_<metrics>``
(``test_accuracy``/``test_accuracies``, ``test_mse``/``test_mses``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwardflow.monitoring.records import finite_or_none
from forwardflow.pipeline.checkpoint import encode
from forwardflow.pipeline.config_files import config_to_dict
from forwardflow.pipeline.files import atomic_write, atomic_write_bytes
from forwardflow.pipeline.targets import ACCURACY, METRICS, Metric
from forwardflow.pipeline.training import RunResult

if TYPE_CHECKING:
    from forwardflow.launch.build import Run


def summary(run: Run, result: RunResult) -> dict[str, Any]:
    config, predictors, calls = run.config, run.predictors, run.calls
    metric = run.dataset.target_spec.metric
    one, every = f"test_{metric.name}", f"test_{metric.plural}"
    last = result.evaluations[-1] if result.evaluations else None
    out = config.output.out
    return {
        "run_id": run.run_id,
        "status": result.status,
        "stopped_by": result.stop_reason,
        "restarts": result.restarts,
        "checkpoint": result.checkpoint,
        # The command that continues the run, where there is a checkpoint to continue from.
        "resume": f"python launch/train.py --resume {out}"
        if result.status != "completed" and result.checkpoint
        else None,
        "dataset": config.data.dataset,
        "rule": config.rule.name,
        "model": config.model.name,
        "epochs": config.schedule.epochs,
        "executor": config.execution.executor,
        "ray_calls": None if calls is None else {"window": calls.window, "microbatches_per_call": calls.per_call},
        "prediction": predictors[0].key,
        "predictions": {p.key: p.label for p in predictors},
        "metric": metric.name,
        one: None if last is None else last.score,
        every: {} if last is None else dict(last.scores),
        "train_samples_per_s": result.train_samples_per_s,
        "wall_s": result.wall_s,
        "evaluations": [
            {
                "epoch": e.epoch + 1,
                one: e.score,
                every: dict(e.scores),
                "train_samples_seen": e.train_samples_seen,
                "wall_s": round(e.wall_s, 3),
            }
            for e in result.evaluations
        ],
        "stages": [
            {
                "stage": s.stage,
                **stage_location(run, i, s.device),
                "precision": s.precision,
                "samples": s.samples,
                "busy_fraction": s.busy_s / max(result.wall_s, 1e-9),
                "mean_loss": finite_or_none(s.mean_loss),
                "train_accuracy": s.train_correct / s.train_scored if s.train_scored else None,
                "peak_memory_bytes": s.peak_memory_bytes,
                "updates": s.updates,
                "first_update_step": s.first_update_step,
            }
            for i, s in enumerate(result.stages)
        ],
        "config": config_to_dict(config),
    }


def stage_location(run: Run, index: int, device: str) -> dict[str, Any]:
    """Where stage ``index`` ran: its device, host and (on Ray) node id, node address and reservation."""
    if index >= len(run.locations):
        return {"device": device}
    location = run.locations[index]
    return {
        "device": location.device,
        "host": location.host,
        "node_id": location.node_id,
        "node_address": location.node_address,
        "num_cpus": location.num_cpus,
        "num_gpus": location.num_gpus,
        "hand_off": location.hand_off,
        "hand_off_reason": location.hand_off_reason,
    }


def placement_lines(run: Run) -> list[str]:
    """On Ray, one line per stage: device, node and reservation (printed when the run starts)."""
    lines = []
    for index, location in enumerate(run.locations):
        if location.node_id is None:
            continue  # the sequential runner: every stage in this process
        gpus = f", {location.num_gpus:g} GPU" if location.num_gpus else ""
        lines.append(
            f"stage {index}: {location.device} on node {location.node_id[:8]} ({location.node_address}, "
            f"{location.host}), {location.num_cpus:g} CPU{gpus}; hands on by {location.hand_off} "
            f"({location.hand_off_reason})"
        )
    return lines


def write_outputs(out: Path, data: dict[str, Any], result: RunResult) -> None:
    """weights.pt (a finished run only: an interrupted run's weights are in its checkpoint), then
    summary.json, each written whole or not at all (WriteError names the file)."""
    if data.get("status", "completed") == "completed":
        # Serialised in memory first: torch.save reports a full disk as a RuntimeError, not an OSError.
        atomic_write_bytes(out / "weights.pt", encode(result.weights))
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write(out / "summary.json", lambda name: Path(name).write_text(text))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def metric_of(data: dict[str, Any]) -> Metric:
    """The metric a summary reports (summaries written before metrics were declared: accuracy)."""
    return next((m for m in METRICS if m.name == data.get("metric")), ACCURACY)


def table(data: dict[str, Any]) -> str:
    """The test score after every epoch (one column per prediction, the rule's own first) and every
    stage's figures."""
    metric = metric_of(data)
    one, every = f"test_{metric.name}", f"test_{metric.plural}"
    labels = data["predictions"]  # key -> label, the rule's own first
    widths = {key: max(9, len(label)) for key, label in labels.items()}
    lines = [
        f"forwardflow: {data['dataset']}, rule {data['rule']}, model {data['model']}, "
        f"{len(data['stages'])} stage(s) on {data['executor']}",
        "",
        f"{'epoch':>5}" + "".join(f"  {label:>{widths[key]}}" for key, label in labels.items()) + f"  {'wall s':>8}",
    ]
    for e in data["evaluations"]:
        cells = "".join(f"  {metric.format(e[every].get(key)):>{widths[key]}}" for key in labels)
        lines.append(f"{e['epoch']:>5}{cells}  {e['wall_s']:>8.1f}")
    nodes = any(s.get("node_id") for s in data["stages"])  # a Ray run: which node each stage ran on
    lines += [
        "",
        f"{'stage':>5}  {'device':<8}  "
        + ("node      " if nodes else "")
        + f"{'samples':>9}  {'busy':>6}  {'mean loss':>10}  {'train acc':>9}",
    ]
    for s in data["stages"]:
        loss = "-" if s["mean_loss"] is None else f"{s['mean_loss']:.4f}"
        node = f"{(s.get('node_id') or '-')[:8]:<8}  " if nodes else ""
        device = s["device"] + (" bf16" if s.get("precision") == "bfloat16" else "")  # older summaries: float32
        lines.append(
            f"{s['stage']:>5}  {device:<8}  {node}{s['samples']:>9}  {100 * s['busy_fraction']:>5.1f}%  "
            f"{loss:>10}  {_pct(s['train_accuracy']):>9}"
        )
    primary = data["prediction"]
    others = [f"{label} {metric.format(data[every].get(key))}" for key, label in labels.items() if key != primary]
    lines += [
        "",
        f"test {metric.label} {metric.format(data[one])} ({'; '.join([labels[primary]] + others)}), "
        f"{data['train_samples_per_s']:.0f} training samples/s, {data['wall_s']:.1f} s",
    ]
    return "\n".join(lines)
