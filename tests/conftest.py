"""Shared fixtures. One Ray instance serves the whole test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance (2 CPUs, small object store), started once for all tests that need it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests compare executors bit for bit; both run with one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_config(**changes):
    """A tiny synthetic run: 3 stages of a small fully connected net."""
    from dataclasses import replace

    from pipeline.presets import fc_model, synthetic_small

    config = synthetic_small()
    config = replace(config, model=fc_model((24, 24, 16), name="fc-tiny"), epochs=2)
    return replace(config, **changes)


@pytest.fixture
def tiny():
    """(config, dataset, schedule, setups) for a small synthetic run; pass changes to rebuild."""
    from pipeline.data import load_dataset
    from pipeline.schedule import MicrobatchSchedule, ScheduleConfig
    from pipeline.stage import stage_setups

    def build(**changes):
        config = small_config(**changes)
        dataset = load_dataset(config.data, config.seed)
        schedule = MicrobatchSchedule(dataset, ScheduleConfig(config.data.batch_size, config.data.eval_batch_size,
                                                              config.epochs, config.seed, config.data.augment))
        setups = stage_setups(config, dataset.num_classes, dataset.input_shape,
                              total_steps=schedule.train_microbatches_per_epoch * config.epochs)
        return config, dataset, schedule, setups

    return build
