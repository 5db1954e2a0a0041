"""What only a GPU can show. These tests run where torch sees a CUDA device (``bash
benchmarks/gpu_session.sh run tests`` runs the suite on a bare GPU machine) and are skipped, saying
so, elsewhere: every rule's steps never wait on the host there; Ray stages sharing the GPU hand on
by CUDA IPC and compute what the sequential runner computes, with the data and its augmentation on
the device; the copy streams change no number; bf16 really is on; stages on two GPUs hand on by
NCCL.

Between processes the executors are compared within a float tolerance on a GPU: the claim of
identical bits is the CPU's at one thread, and another process may get other cuBLAS or cuDNN
algorithms. An executor that learned from stale or reordered inputs misses by the size of an
update (lr 2e-3), far outside it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import assert_same_weights, run_to_end, small_sequence_config, tweak
from test_rules import CONV, RULE_NAMES, config_for

from benchmarks.device_check import WARMUP_MICROBATCHES, sync_debug_observer
from forwardflow.actors.transport import OBJECT_STORE
from forwardflow.launch.build import build_run
from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.rules.sigprop import SigPropOptions

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_session.sh runs these on a GPU machine)"
)
SEQUENCE_RULES = ("sigprop", "bptt", "tbptt", "rtrl")
BETWEEN_PROCESSES = (1e-4, 1e-5)  # rtol, atol: see the module's docstring


def on_gpu(config, **execution):
    return tweak(config, execution={"device": "cuda", **execution})


def sigprop_recomputing(config):
    """Signal Propagation with a loss per layer, each loss's tail recomputed in its backward pass."""
    return replace(config, rule=RuleConfig("sigprop", SigPropOptions(loss_at="layer", recompute=True)))


@pytest.mark.parametrize(
    "config",
    [pytest.param(lambda rule=rule: config_for(rule), id=rule) for rule in RULE_NAMES]
    + [
        pytest.param(lambda rule=rule: small_sequence_config(rule=rule), id=f"{rule}-sequence")
        for rule in SEQUENCE_RULES
    ]
    + [pytest.param(lambda: sigprop_recomputing(config_for("sigprop", model=CONV)), id="sigprop-conv-recompute")],
)
def test_on_a_gpu_no_step_of_any_rule_waits_on_the_host(config):
    # After a warm-up the run goes on under set_sync_debug_mode("error"): any synchronisation but
    # the sanctioned periodic reads (pipeline/device.py: host_read) raises, naming where.
    observer = sync_debug_observer()
    try:
        with build_run(on_gpu(config()), [observer]) as run:
            result = run.train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert observer.submitted > WARMUP_MICROBATCHES, "the mode was never armed"
    assert result.evaluations and all(stage.samples > 0 for stage in result.stages)


@pytest.mark.parametrize("augment", [False, True], ids=["fc", "conv-augmented"])
def test_on_a_gpu_ray_stages_sharing_it_hand_on_by_cuda_ipc_as_the_sequential_run_computes(ray_cluster, augment):
    config = config_for("sigprop", model=CONV, epochs=1) if augment else config_for("sigprop", epochs=1)
    config = on_gpu(tweak(config, data={"augment": augment, "placement": "device"}))
    sequential = run_to_end(config)
    ray_config = tweak(config, execution={"executor": "ray", "window": 4})
    with build_run(ray_config) as run:
        # One stage's share of the one GPU each; every hop but the last (to the driver) by CUDA IPC.
        assert {location.device for location in run.locations} == {"cuda:0"}
        assert all(0 < (location.num_gpus or 0) < 1 for location in run.locations)
        hops = [location.hand_off for location in run.locations]
        assert hops == ["cuda-ipc"] * (len(hops) - 1) + [OBJECT_STORE], run.locations
        for plan in list(run.schedule)[:4]:
            run.executor.submit(plan)
        refs = run.executor._calls[0].refs
        assert [ref.tensor_transport() for ref in refs[:-1]] == ["CUDA_IPC"] * (len(refs) - 1)
        run.executor.completed(wait=True)
    assert_same_weights(sequential.weights, run_to_end(ray_config).weights, tolerance=BETWEEN_PROCESSES)


def test_on_a_gpu_the_copy_streams_change_no_number(ray_cluster):
    # The data in pinned host memory, each microbatch copied in on a side stream beside the compute
    # (--streams): the same kernels on the same values, so the same bits in one process.
    config = on_gpu(config_for("sigprop", epochs=1), threads=1)
    config = tweak(config, data={"placement": "host"})
    plain = run_to_end(config)
    assert_same_weights(plain.weights, run_to_end(tweak(config, execution={"streams": True})).weights)
    ray_streams = run_to_end(tweak(config, execution={"executor": "ray", "streams": True}))
    assert_same_weights(plain.weights, ray_streams.weights, tolerance=BETWEEN_PROCESSES)


def test_on_a_gpu_bf16_and_channels_last_are_on_and_the_weights_stay_float32():
    # On a CPU channels-last changes nothing, and bf16 only where the CPU multiplies in bfloat16
    # (tests/test_device_options.py); here both must.
    config = on_gpu(tweak(config_for("sigprop", model=CONV, epochs=1), data={"train_limit": 256}))
    plain = run_to_end(config)
    fast = run_to_end(tweak(config, execution={"bf16": True, "channels_last": True}))
    assert {stats.precision for stats in fast.stages} == {"bfloat16"}
    for stage in fast.weights:
        assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in stage.values())
    assert any(not torch.equal(plain.weights[0][k], fast.weights[0][k]) for k in plain.weights[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_on_two_gpus_stages_hand_on_by_nccl_as_the_sequential_run_computes(ray_cluster):
    config = tweak(on_gpu(config_for("sigprop", epochs=1)), model={"stages": 2})
    ray_config = tweak(config, execution={"executor": "ray", "window": 4, "gpus_per_stage": 1})
    with build_run(ray_config) as run:
        assert [(location.device, location.num_gpus) for location in run.locations] == [("cuda:0", 1), ("cuda:1", 1)]
        assert [location.hand_off for location in run.locations] == ["nccl", OBJECT_STORE]
    assert_same_weights(run_to_end(config).weights, run_to_end(ray_config).weights, tolerance=BETWEEN_PROCESSES)
