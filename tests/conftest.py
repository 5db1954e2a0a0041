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
