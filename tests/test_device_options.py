"""The options for GPUs (bf16 autocast, channels-last, torch.compile, copy streams) and the data's
placement: generated flags, on in the GPU preset, harmless on a CPU (the same numbers as off), and
bfloat16 hand-ons that survive the trip between actors."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import assert_same_weights, run_to_end, tweak
from test_rules import CONV, config_for

from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.pipeline.messages import TRAIN, Microbatch
from forwardflow.pipeline.presets import cifar_vgg
from forwardflow.pipeline.stage import DeviceOptions
from forwardflow.pipeline.validation import ConfigError

GPU_OPTIONS = {"bf16": True, "channels_last": True, "compile": True, "streams": True}


def test_the_gpu_options_and_the_data_placement_are_flags():
    config = parse_config(
        ["--bf16", "--channels-last", "--compile", "--streams", "--data-placement", "host", "--nan-check-every", "5"]
    )
    execution = config.execution
    assert (execution.bf16, execution.channels_last, execution.compile, execution.streams) == (True,) * 4
    assert config.data.placement == "host" and execution.nan_check_every == 5
    assert parse_config(["--microbatches-per-call", "2", "--balance", "macs"]).model.balance == "macs"
    with pytest.raises(ConfigError, match="--microbatches-per-call: must be at most --window"):
        parse_config(["--microbatches-per-call", "9", "--window", "8"])
    plain = parse_config([]).execution
    assert not (plain.bf16 or plain.channels_last or plain.compile or plain.streams)


def test_the_gpu_preset_turns_on_what_changes_numbers_only_there():
    execution = cifar_vgg().execution
    assert execution.bf16 and execution.channels_last and execution.streams and not execution.compile


def test_on_a_cpu_the_gpu_options_change_nothing():
    config = tweak(config_for("sigprop", model=CONV, epochs=1), data={"train_limit": 256, "placement": "host"})
    fast = tweak(config, execution=GPU_OPTIONS)
    run = build_run(fast)
    assert all(setup.options == DeviceOptions(bf16=True, channels_last=True, compile=True) for setup in run.setups)
    assert_same_weights(run_to_end(config).weights, run_to_end(fast).weights)


def test_a_bfloat16_hand_on_survives_the_trip_between_actors():
    inputs = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    mb = Microbatch(7, TRAIN, 0, inputs, torch.arange(4), extra={"goodness": torch.randn(4, 2).to(torch.bfloat16)})
    back = pickle.loads(pickle.dumps(mb))
    assert back.inputs.dtype == torch.bfloat16 and torch.equal(back.inputs, inputs)
    assert torch.equal(back.extra["goodness"], mb.extra["goodness"]) and back.index == 7
