"""What one metrics collection holds, and the run's metrics log (``metrics.jsonl`` in ``--out``).

The same records feed the Prometheus exporter and the log, so the PNG plots drawn from the log
show what Grafana shows. One JSON object per line, appended as the run goes; a reader of a log
that is still being written sees whole lines only (each line is written by one ``write``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forwardflow.pipeline.files import FILE_MODE
from forwardflow.pipeline.messages import StageStats, WriteError

LOG_NAME = "metrics.jsonl"
NON_FINITE_LOSS = "non_finite_loss"  # the error kind every run exports from the start (at 0)

# Kinds of log lines.
PROGRESS = "progress"  # a periodic collection during the run
EVALUATION = "evaluation"  # a test-set pass finished
END = "end"  # the final collection, after the pipeline drained
ERROR = "error"  # the run stopped on an error


@dataclass(frozen=True)
class RunInfo:
    """Constant facts about the run, exported as ``forwardflow_run_info`` (the run selector's
    source)."""

    run_id: str
    dataset: str
    rule: str
    model: str
    executor: str
    stages: int
    epochs: int


@dataclass
class StageRecord:
    """One stage at one collection. Counters are cumulative since the start of the run; ``loss``
    and ``train_accuracy`` are over the training microbatches since the previous collection (the
    latest values stand through an interval without any)."""

    stage: int
    device: str
    samples: int
    microbatches: int
    compute_s: float
    wait_s: float
    handoff_s: float
    loss: float | None
    train_accuracy: float | None
    lr: float
    weight_norm: float
    update_norm: float
    memory_bytes: int
    peak_memory_bytes: int
    step_counts: list[int]  # cumulative histogram of training-step times over STEP_BUCKETS (+ above)
    step_seconds: float  # cumulative
    step_mean_s: float | None  # mean step time since the previous collection
    # Sequence data: the time step (1-based) of the latest microbatch the stage finished, and the
    # sequences' length (0 for data that is not a sequence); optimizer steps so far.
    time_step: int = 0
    sequence_length: int = 0
    updates: int = 0


@dataclass
class RunRecord:
    kind: str
    run_id: str
    time: float  # time.time()
    elapsed_s: float
    train_samples: int
    samples_per_s: float  # since the previous collection
    microbatches_done: int
    microbatches_total: int
    epoch: int  # 1-based epoch of the latest completed microbatch (0 before the first)
    eta_s: float | None  # None until the first microbatch is done
    in_flight: int
    backlog: list[int]  # per stage: microbatches handed to it that it has not finished (live)
    # The latest test score per predictor, in the field of the task's metric (pipeline/targets.py).
    test_accuracy: dict[str, float] = field(default_factory=dict)
    test_mse: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # per kind, cumulative
    restarts: int = 0  # stage actors restarted, cumulative
    stages: list[StageRecord] | None = None  # None: no new stage statistics at this collection

    @property
    def progress(self) -> float:
        return self.microbatches_done / self.microbatches_total if self.microbatches_total else 0.0


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def stage_record(current: StageStats, previous: StageStats | None, device: str) -> StageRecord:
    """A record of ``current``, with the interval values taken against ``previous``: the one
    place where values over an interval are derived from the stage's cumulative counters."""
    loss_count = current.loss_count - (previous.loss_count if previous else 0)
    loss_sum = current.loss_sum - (previous.loss_sum if previous else 0.0)
    scored = current.train_scored - (previous.train_scored if previous else 0)
    correct = current.train_correct - (previous.train_correct if previous else 0)
    steps = current.steps - (previous.steps if previous else 0)
    step_seconds = current.step_seconds - (previous.step_seconds if previous else 0.0)
    # Without a new training step in the interval (an evaluation pass, the end of the run) the
    # stage's latest loss and its accuracy so far stand, so that a gauge never disappears.
    loss = loss_sum / loss_count if loss_count else finite_or_none(current.last_loss)
    return StageRecord(
        stage=current.stage,
        device=device,
        samples=current.samples,
        microbatches=current.microbatches,
        compute_s=current.busy_s,
        wait_s=current.wait_s,
        handoff_s=current.handoff_s,
        loss=finite_or_none(loss) if loss is not None else None,
        train_accuracy=correct / scored if scored else _ratio(current.train_correct, current.train_scored),
        lr=current.lr,
        weight_norm=current.weight_norm,
        update_norm=current.update_norm,
        memory_bytes=current.memory_bytes,
        peak_memory_bytes=current.peak_memory_bytes,
        step_counts=list(current.step_counts),
        step_seconds=current.step_seconds,
        step_mean_s=step_seconds / steps if steps else None,
        time_step=current.time_step,
        sequence_length=current.sequence_length,
        updates=current.updates,
    )


class MetricsLog:
    """Appends records to ``<out>/metrics.jsonl``; the directory is made at the first write, so a
    run rejected at validation leaves nothing behind."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOG_NAME

    def append(self, record: RunRecord) -> None:
        # Strict JSON: a non-finite number (a diverged norm, an unknown ETA) is written as null.
        line = json.dumps(_strict(asdict(record)), allow_nan=False) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            with open(self.path, "a") as handle:
                handle.write(line)
            if created:
                os.chmod(self.path, FILE_MODE)  # whatever the umask
        except OSError as error:  # a full disk: one line naming the file, the checkpoints intact
            raise WriteError(str(self.path), error.strerror or str(error)) from None

    def rewind(self, run_id: str, microbatches_done: int) -> None:
        """Drop this run's records from the first one past ``microbatches_done`` on (a run went
        back to a checkpoint there). Records are appended in order, so what follows goes too."""
        if not self.path.is_file():
            return
        offset = 0
        with open(self.path, "rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:  # a torn last line
                    break
                if record.get("run_id") == run_id and record.get("microbatches_done", 0) > microbatches_done:
                    break
                offset += len(line)
        try:
            with open(self.path, "rb+") as handle:
                handle.truncate(offset)
        except OSError as error:
            raise WriteError(str(self.path), error.strerror or str(error)) from None


def _strict(value):
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict(item) for item in value]
    return value


def read_log(path: str | Path, run_id: str | None = None) -> list[RunRecord]:
    """The records of one run from a log (the last run in the file unless ``run_id`` is given:
    a reused ``--out`` directory holds several runs). A torn last line is skipped."""
    lines = []
    for number, text in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("run_id"), str) or "stages" not in line:
            raise ValueError(f"{path}: line {number} is not a record of a run (written by another program?)")
        lines.append(line)
    if not lines:
        return []
    wanted = run_id or lines[-1]["run_id"]
    records = []
    for line in lines:
        if line["run_id"] != wanted:
            continue
        stages = line.pop("stages")
        try:
            records.append(RunRecord(**line, stages=None if stages is None else [StageRecord(**s) for s in stages]))
        except TypeError as error:  # fields of another version, or of another program
            raise ValueError(f"{path}: a record of run {wanted} does not match this version ({error})") from None
    return records
