"""The end of a run: the result table on the terminal and ``summary.json`` in ``--out``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.training import RunResult


def summary(config: TrainConfig, result: RunResult, executor: str, devices: list[str]) -> dict:
    last = result.evaluations[-1] if result.evaluations else None
    data = {
        "run_id": config.run_id,
        "dataset": config.data.dataset,
        "rule": config.rule.name,
        "loss": config.rule.loss if config.rule.name == "sigprop" else None,
        "model": config.model.name,
        "epochs": config.epochs,
        "batch_size": config.data.batch_size,
        "lr": config.optim.lr,
        "seed": config.seed,
        "executor": executor,
        "test_accuracy": None if last is None else last.best_accuracy,
        "train_samples_per_s": result.train_samples_per_s,
        "wall_s": result.wall_s,
        "evaluations": [{"epoch": e.epoch + 1, "test_accuracy": e.accuracy, "test_accuracy_head": e.accuracy_head,
                         **{f"test_accuracy_{k}": v for k, v in e.extra.items()},
                         "train_samples_seen": e.train_samples_seen, "wall_s": round(e.wall_s, 3)}
                        for e in result.evaluations],
        "stages": [{"stage": s.stage, "device": devices[i] if i < len(devices) else s.device,
                    "samples": s.samples, "busy_fraction": s.busy_s / max(result.wall_s, 1e-9),
                    "mean_loss": s.mean_loss,
                    "train_accuracy": s.train_correct / s.train_scored if s.train_scored else None,
                    "peak_memory_bytes": s.peak_memory_bytes}
                   for i, s in enumerate(result.stages)],
    }
    if last is not None and last.accuracy_head is not None:
        data["test_accuracy_head"] = last.accuracy_head
    return data


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file beside ``path`` and rename: a reader never sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_outputs(out: Path, data: dict, result: RunResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "weights.pt", lambda name: torch.save(result.weights, name))
    _atomic_write(out / "summary.json", lambda name: Path(name).write_text(json.dumps(data, indent=2) + "\n"))


WIDTH = 15  # of a rule-specific accuracy column


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def table(data: dict) -> str:
    # Rule-specific predictions (ff label scanning, a local head's) get a column each.
    extras = {key.removeprefix("test_accuracy_").replace("_", " ") + " acc": key
              for key in (data["evaluations"][0] if data["evaluations"] else {})
              if key.startswith("test_accuracy_") and key != "test_accuracy_head"}
    lines = [f"forwardflow: {data['dataset']}, rule {data['rule']}, model {data['model']}, "
             f"{len(data['stages'])} stage(s) on {data['executor']}",
             "",
             f"{'epoch':>5}  {'test acc':>9}  {'head acc':>9}" + "".join(f"  {name:>{WIDTH}}" for name in extras)
             + f"  {'wall s':>8}"]
    for e in data["evaluations"]:
        lines.append(f"{e['epoch']:>5}  {_pct(e['test_accuracy']):>9}  {_pct(e['test_accuracy_head']):>9}"
                     + "".join(f"  {_pct(e.get(key)):>{WIDTH}}" for key in extras.values())
                     + f"  {e['wall_s']:>8.1f}")
    lines += ["", f"{'stage':>5}  {'device':<8}  {'samples':>9}  {'busy':>6}  {'mean loss':>10}  {'train acc':>9}"]
    for s in data["stages"]:
        lines.append(f"{s['stage']:>5}  {s['device']:<8}  {s['samples']:>9}  {100 * s['busy_fraction']:>5.1f}%  "
                     f"{s['mean_loss']:>10.4f}  {_pct(s['train_accuracy']):>9}")
    lines += ["", f"test accuracy {_pct(data['test_accuracy'])}"
              + (f" (head {_pct(data['test_accuracy_head'])})" if data.get("test_accuracy_head") is not None else "")
              + f", {data['train_samples_per_s']:.0f} training samples/s, {data['wall_s']:.1f} s"]
    return "\n".join(lines)
