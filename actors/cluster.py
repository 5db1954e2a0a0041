"""Connecting to Ray: a local instance, or an existing cluster checked for reachability first so
that a wrong ``--address`` fails in seconds with one line instead of hanging."""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

import ray

from forwardflow.pipeline.validation import ConfigError

CONNECT_TIMEOUT_S = 5.0


def _host_port(address: str) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else "ray://" + address)
    if not parsed.hostname or not parsed.port:
        raise ConfigError("--address", f"{address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return parsed.hostname, parsed.port


def check_address(address: str) -> None:
    """Raise ConfigError unless something answers at ``address`` (``auto`` is left to Ray)."""
    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise ConfigError("--address", f"no Ray cluster answers at {address} ({error.strerror or error})") from None


def connect(address: str | None) -> dict[str, float]:
    """Start or join Ray and return the cluster's resources.

    Under ``ray job submit`` RAY_ADDRESS is set and ``ray.init()`` joins that cluster. Without it,
    a local instance starts: no dashboard, worker logs kept out of the driver's output.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    # Joining a cluster: Ray's INFO lines ("Connecting to existing Ray cluster ...") are left out, so
    # that the run's own lines, and a refused plan's one line, are all a user sees.
    if address:
        check_address(address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray.cluster_resources()
