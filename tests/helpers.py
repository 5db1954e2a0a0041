"""Helpers the tests share: small configs, built through the one builder."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from forwardflow.launch.build import build_run
from forwardflow.pipeline.config import DataConfig, RuleConfig, RunConfig
from forwardflow.pipeline.messages import EVAL, Prediction
from forwardflow.pipeline.presets import adding, fc_model, rnn_model, synthetic_small
from forwardflow.pipeline.training import RunObserver, RunResult


def tweak(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """``config`` with fields of its sections changed: ``tweak(c, schedule={"epochs": 3})``."""
    return replace(config, **{name: replace(getattr(config, name), **values) for name, values in sections.items()})


def small_config(executor: str = "sequential", **changes: Any) -> RunConfig:
    """A tiny synthetic run: 3 stages of a small fully connected net, 2 epochs, no progress bar."""
    config = synthetic_small()
    config = replace(config, model=fc_model((24, 24, 16), name="fc-tiny"))
    config = tweak(
        config,
        schedule={"epochs": 2},
        monitoring={"progress": False},
        execution={"executor": executor, "device": "cpu"},
    )
    return replace(config, **changes)


def small_sequence_config(
    executor: str = "sequential", dataset: str = "synthetic", rule: str = "sigprop", **changes: Any
) -> RunConfig:
    """A tiny sequence run through two GRU layers (two stages for a per-step rule): the synthetic
    images by rows (8 time steps of 8 values, 4 classes) or the adding problem (8 steps); 1 epoch, no
    progress bar."""
    sequence = "rows" if dataset == "synthetic" else "none"
    base = adding()
    length = 8 if dataset == "adding" else DataConfig().sequence_length  # T applies to the adding problem only
    config = replace(
        base,
        data=replace(
            base.data, dataset=dataset, sequence=sequence, sequence_length=length, train_limit=256, test_limit=64
        ),
        model=rnn_model((12, 10), name="gru-tiny"),
        rule=RuleConfig(rule),
    )
    config = tweak(
        config,
        schedule={"epochs": 1, "batch_size": 32, "eval_batch_size": 64},
        optim={"lr": 3e-3},
        monitoring={"progress": False},
        execution={"executor": executor, "device": "cpu"},
    )
    return replace(config, **changes)


def run_to_end(config: RunConfig, observers=()) -> RunResult:
    with build_run(config, observers) as run:
        return run.train()


class EvalOutputs(RunObserver):
    """Every evaluation prediction, per sample and predictor, in stream order."""

    def __init__(self):
        self.outputs: dict[str, list[torch.Tensor]] = {}

    def on_prediction(self, prediction: Prediction, progress) -> None:
        if prediction.phase == EVAL:
            for key, predicted in prediction.outputs.items():
                self.outputs.setdefault(key, []).append(predicted)

    def stacked(self) -> dict[str, torch.Tensor]:
        return {key: torch.cat(parts) for key, parts in self.outputs.items()}


def assert_same_weights(left, right, tolerance: tuple[float, float] | None = None):
    """Identical weights, stage by stage; within ``tolerance`` (rtol, atol) where one is given."""
    assert len(left) == len(right)
    for stage, (a, b) in enumerate(zip(left, right)):
        assert a.keys() == b.keys()
        for name in a:
            if tolerance is None:
                assert torch.equal(a[name], b[name]), f"stage {stage} {name} differs"
            else:
                rtol, atol = tolerance
                torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=f"stage {stage} {name}")


def assert_executors_agree(config: RunConfig, **ray_execution) -> RunResult:
    """Sequential and Ray runs of ``config`` (the Ray run with ``ray_execution`` settings too):
    identical final weights and identical per-sample predictions of every evaluation pass; returns
    the sequential result. Needs the Ray fixture."""
    outputs, results = {}, {}
    for executor in ("sequential", "ray"):
        observer = EvalOutputs()
        settings = {"executor": executor, **(ray_execution if executor == "ray" else {})}
        results[executor] = run_to_end(tweak(config, execution=settings), [observer])
        outputs[executor] = observer.stacked()
    assert_same_weights(results["sequential"].weights, results["ray"].weights)
    assert outputs["sequential"].keys() == outputs["ray"].keys() and outputs["sequential"]
    for key in outputs["sequential"]:
        assert torch.equal(outputs["sequential"][key], outputs["ray"][key]), f"{key} predictions differ"
    return results["sequential"]
