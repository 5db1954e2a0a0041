"""The options for GPUs (bf16 autocast, channels-last, torch.compile, copy streams) and the data's
placement: generated flags, on in the GPU preset, harmless on a CPU (the same numbers as off) but
for bf16 where the CPU multiplies in bfloat16, and bfloat16 hand-ons that survive the trip between
actors."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import assert_executors_agree, assert_same_weights, run_to_end, tweak
from test_rules import CONV, config_for

from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.pipeline import device as device_module
from forwardflow.pipeline.device import bfloat16_in_cpu_flags
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


def small_conv_run():
    return tweak(config_for("sigprop", model=CONV, epochs=1), data={"train_limit": 256, "placement": "host"})


def test_on_a_cpu_without_bfloat16_instructions_the_gpu_options_change_nothing(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_computes_bfloat16", lambda: False)
    config = small_conv_run()
    fast = tweak(config, execution=GPU_OPTIONS)
    run = build_run(fast)
    assert all(setup.options == DeviceOptions(bf16=True, channels_last=True, compile=True) for setup in run.setups)
    result = run_to_end(fast)
    assert_same_weights(run_to_end(config).weights, result.weights)
    assert {stats.precision for stats in result.stages} == {"float32"}


def test_on_a_cpu_with_bfloat16_instructions_bf16_computes_in_bfloat16_and_the_rest_change_nothing(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_computes_bfloat16", lambda: True)
    config = small_conv_run()
    plain, bf16 = run_to_end(config), run_to_end(tweak(config, execution={"bf16": True}))
    every_option = run_to_end(tweak(config, execution=GPU_OPTIONS))
    assert {stats.precision for stats in bf16.stages} == {"bfloat16"}
    assert {stats.precision for stats in plain.stages} == {"float32"}
    # Channels-last, compile and the copy streams are still ignored on a CPU: bf16 alone decides.
    assert_same_weights(bf16.weights, every_option.weights)
    # The weights stay float32 (the optimizer updates them) but were learned in bfloat16.
    for plain_weights, bf16_weights in zip(plain.weights, bf16.weights):
        assert all(bf16_weights[name].dtype == plain_weights[name].dtype for name in plain_weights)
    assert any(
        not torch.equal(plain_weights[name], bf16_weights[name])
        for plain_weights, bf16_weights in zip(plain.weights, bf16.weights)
        for name in plain_weights
        if plain_weights[name].is_floating_point()
    )


def test_with_bf16_the_executors_agree_bit_for_bit(ray_cluster):
    # bfloat16 where this CPU multiplies in it (each actor decides for itself), float32 elsewhere:
    # either way the pipeline computes what the sequential runner computes.
    assert_executors_agree(tweak(config_for("sigprop", epochs=1), execution={"bf16": True}))


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm
        ("model name\t: bf16 avx512_bf16\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),
        ("Features\t: fp asimd crc32\n", False),
        ("", False),
    ],
)
def test_bfloat16_instructions_are_read_from_the_cpu_flags(cpuinfo, native):
    assert bfloat16_in_cpu_flags(cpuinfo) is native


def test_a_bfloat16_hand_on_survives_the_trip_between_actors():
    inputs = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    mb = Microbatch(7, TRAIN, 0, inputs, torch.arange(4), extra={"goodness": torch.randn(4, 2).to(torch.bfloat16)})
    back = pickle.loads(pickle.dumps(mb))
    assert back.inputs.dtype == torch.bfloat16 and torch.equal(back.inputs, inputs)
    assert torch.equal(back.extra["goodness"], mb.extra["goodness"]) and back.index == 7
