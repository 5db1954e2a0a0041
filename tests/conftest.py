"""Shared fixtures and helpers. One Ray instance serves the whole test session; every run is built
by the one builder (forwardflow.launch.build.build_run), as launch/train.py builds it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import small_config

from forwardflow.launch.build import Run, build_run


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance (2 CPUs, small object store), started once for all tests that need it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests compare executors bit for bit; both run with one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny():
    """Build (not start) a small synthetic run; keyword arguments change RunConfig fields."""

    def build(**changes: Any) -> Run:
        return build_run(small_config(**changes))

    return build
