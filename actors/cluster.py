"""Connecting to Ray: a local instance, or an existing cluster checked for reachability first so
that a wrong ``--address`` fails in seconds with one line instead of hanging."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import ray
from ray._private import ray_constants, services

from forwardflow.pipeline.validation import ConfigError

CONNECT_TIMEOUT_S = 5.0


def _host_port(address: str) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else "ray://" + address)
    try:
        port = parsed.port  # a port that is not a number, or past 65535, raises here
    except ValueError:
        port = None
    if not parsed.hostname or not port:
        raise ConfigError("--address", f"{address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return parsed.hostname, port


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


# Ray's single-machine mode (the one it uses on macOS and Windows): every server binds to 127.0.0.1.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def _start_local_ray(dashboard: bool) -> None:
    """A Ray of this machine only: nothing listens on an address another machine can reach.

    Ray binds its servers (GCS, raylet, object manager, workers, the dashboard agent, the
    autoscaler monitor's and the dashboard's metrics) to every interface unless the node's address
    is loopback, and it turns an explicit ``_node_ip_address="127.0.0.1"`` back into the machine's
    reachable address (``resolve_ip_for_localhost``) except in its single-machine mode, which
    SINGLE_MACHINE_ENV=0 selects. The processes Ray starts read it from their environment; this
    process imported Ray already, so its copy of the setting is changed too. The dashboard (only
    with --ray-dashboard) is bound to loopback as well; token authentication stays as Ray sets it.
    """
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    with _own_session():
        ray.init(
            address="local",  # a Ray of our own, never one that `ray start` left running here
            _node_ip_address=LOOPBACK,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            log_to_driver=False,
        )


@contextmanager
def _own_session() -> Iterator[None]:
    """Ray's processes (GCS, raylet, agents) started meanwhile go into a session of their own.

    They would otherwise share the driver's process group, so a signal to the whole group (``timeout``,
    ``kill -TERM -PGID``, a batch scheduler stopping a job) would kill them at the moment the driver
    starts to stop cleanly: it would then lose Ray mid-checkpoint and die in Ray's own words. Apart,
    only the driver gets the signal; it stops at a checkpoint and shuts Ray down. They still end
    with the driver if it dies (Ray asks the kernel to kill them when their parent exits), and Ray
    already keeps Ctrl-C's SIGINT from them."""
    original = services.ConsolePopen

    class OwnSession(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    setattr(services, "ConsolePopen", OwnSession)  # noqa: B010 - Ray's module attribute, for this block only
    try:
        yield
    finally:
        setattr(services, "ConsolePopen", original)  # noqa: B010


_started_here = False  # whether connect() started the Ray it is connected to


def disconnect() -> None:
    """Shut down the local Ray that ``connect`` started (a joined cluster, or a Ray someone else
    started in this process, such as a test session's, is left as it is)."""
    global _started_here  # noqa: PLW0603 - one Ray per process, as Ray itself keeps it
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def connect(address: str | None, dashboard: bool = False) -> dict[str, float]:
    """Start or join Ray and return the cluster's resources.

    Under ``ray job submit`` RAY_ADDRESS is set and ``ray.init()`` joins that cluster. Without it,
    a local instance starts, on loopback only (``_start_local_ray``), without a dashboard unless
    asked for, worker logs kept out of the driver's output.
    """
    global _started_here  # noqa: PLW0603 - one Ray per process, as Ray itself keeps it
    if ray.is_initialized():
        return ray.cluster_resources()
    with _own_sigterm_handler():
        _init(address, dashboard)
        _started_here = not address and not os.environ.get("RAY_ADDRESS")
    return ray.cluster_resources()


@contextmanager
def _own_sigterm_handler() -> Iterator[None]:
    """ray.init replaces the process's SIGTERM handler with one that exits at once (status 15,
    with a C++ stack dump); the caller's handler (launch/train.py stops at a checkpoint, or
    before training, cleanly) is put back, so a SIGTERM while the stages start is the caller's."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        yield
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init(address: str | None, dashboard: bool) -> None:
    # Joining a cluster: Ray's INFO lines ("Connecting to existing Ray cluster ...") are left out, so
    # that the run's own lines, and a refused plan's one line, are all a user sees.
    if address:
        check_address(address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
    else:
        _start_local_ray(dashboard)
