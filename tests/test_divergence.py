"""A loss that becomes NaN or inf, or explodes far above its running median (or its first value),
stops the run naming the stage, the microbatch and the likely causes; the last checkpoint stays."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from helpers import small_config, tweak

from forwardflow.launch.build import build_run
from forwardflow.launch.train import main
from forwardflow.pipeline.divergence import LossWatch
from forwardflow.pipeline.messages import TRAIN, LossExplodedError, NonFiniteLossError
from forwardflow.pipeline.runner import SequentialRunner


def test_the_watch_flags_a_spike_and_a_climb_but_not_noise_or_a_loss_near_zero():
    watch = LossWatch(factor=100)
    for step, value in enumerate([2.0, 3.0, 1.5, 2.5, 0.0, 2.2]):  # noise, and a 0 without scale
        watch.check(value, stage=1, microbatch=step)
    with pytest.raises(LossExplodedError) as caught:
        watch.check(250.0, stage=1, microbatch=9)
    assert (caught.value.stage, caught.value.microbatch, caught.value.compared_with) == (1, 9, "running median")
    falling = LossWatch(factor=100)
    for step in range(60):
        falling.check(2.0 * 0.8**step, stage=0, microbatch=step)  # down to 1e-5
    falling.check(1.5, stage=0, microbatch=60)  # 10^5 x the median, but below where it started: no alarm
    climbing = LossWatch(factor=100)
    value = 1.0
    with pytest.raises(LossExplodedError, match="times its first value"):
        for step in range(100):
            climbing.check(value, stage=2, microbatch=step)
            value *= 1.2  # never a spike against the running median, always climbing
    restored = LossWatch(factor=100)
    restored.load_state_dict(watch.state_dict())
    assert restored.state_dict() == watch.state_dict()


def extreme_microbatch(run, position: int) -> None:
    """The training samples the schedule puts in microbatch ``position`` get extreme values."""
    stream = run.schedule.stream()
    next(stream)  # the first epoch's order is drawn
    size = run.config.schedule.batch_size
    run.dataset.train_x[stream.order[position * size : (position + 1) * size]] *= -1e4


def test_an_exploding_loss_stops_the_run_before_its_update_naming_stage_and_microbatch():
    run = build_run(small_config())
    extreme_microbatch(run, 5)
    with run, pytest.raises(LossExplodedError) as caught:
        run.train()
    error = caught.value
    assert error.stage == 0 and error.microbatch == 5 and error.value > 100 * error.reference
    assert f"stage 0: local loss {error.value:.4g} at microbatch 5 is" in str(error) and "lower --lr" in str(error)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_non_finite_loss_from_the_data_says_the_data(value):
    run = build_run(small_config())
    run.dataset.train_x[5, -1] = value  # one input of one sample
    with run, pytest.raises(NonFiniteLossError, match="inputs hold NaN or inf: check the data"):
        run.train()


def test_a_diverged_run_exits_3_in_one_line_and_keeps_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "synthetic", "--executor", "sequential", "--no-progress", "--out", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main([*argv, "--optimizer", "sgd", "--lr", "0.5", "--checkpoint-every", "1"])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("forwardflow:")]
    assert status == 3 and len(lines) == 2, lines
    assert "stage 1: local loss" in lines[1] and "at microbatch 3 is" in lines[1] and "lower --lr" in lines[1]
    assert f"the last complete checkpoint, {out}/checkpoints/mb-000000003, is kept" in lines[1]
    assert (out / "checkpoints" / "mb-000000003" / "manifest.json").is_file()


def test_the_factor_is_a_setting_and_0_turns_the_watch_off():
    config = tweak(small_config(), optim={"divergence_factor": 0.0})
    run = build_run(config)
    extreme_microbatch(run, 5)
    with run:
        run.train()  # only NaN or inf would stop it now


def test_an_exploded_loss_never_reaches_the_weights_though_it_is_read_later():
    # The stage reads its losses after the first step and then every --nan-check-every steps; in
    # between, its device compares each loss with the watch's limit and the optimizer skips every
    # step from the first loss past it, so the weights stay as they were before that microbatch.
    config = tweak(small_config("sequential"), execution={"nan_check_every": 16})
    run = build_run(config)
    extreme_microbatch(run, 5)
    runner = SequentialRunner(run.setups, run.dataset)
    plans = [plan for plan in run.schedule if plan.phase == TRAIN]
    for plan in plans[:5]:
        runner.submit(plan)
    before = [p.detach().clone() for p in runner.stages[0].blocks.parameters()]
    for plan in plans[5:10]:
        runner.submit(plan)  # no read among these: the error waits on the device
    after = [p.detach().clone() for p in runner.stages[0].blocks.parameters()]
    assert all(torch.equal(old, new) for old, new in zip(before, after))
    with pytest.raises(LossExplodedError) as caught:
        runner.stages[0].check_finite()
    assert caught.value.microbatch == plans[5].index
