"""Real processes: ``launch/train.py`` as a user starts it, with a local Ray of its own. Every
process that run starts listens on loopback only."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
LONG_RAY_RUN = ["--preset", "synthetic", "--executor", "ray", "--epochs", "400", "--no-progress"]


class Training:
    """``python launch/train.py ARGV`` in a process of its own; stderr collected line by line."""

    def __init__(self, argv: list[str]):
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "train.py"), *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, f"exited {self.process.returncode}: {self.lines}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s:g} s: {self.lines}"
            time.sleep(0.1)

    def finish(self, timeout_s: float = 120.0) -> int:
        status = self.process.wait(timeout_s)
        self._reader.join(10)
        return status

    def ours(self) -> list[str]:
        """forwardflow's own lines (Ray prints a few of its own when it starts)."""
        return [line for line in self.lines if line.startswith("forwardflow:")]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def listening_sockets(pid: int) -> dict[str, list[str]]:
    """Every listening TCP socket and bound UDP socket of ``pid`` and all its descendants."""
    found: dict[str, list[str]] = {}
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline())[:100] or process.name()
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN or connection.type == 2:  # SOCK_DGRAM
                    found.setdefault(f"{process.pid} {name}", []).append(
                        f"{connection.laddr.ip}:{connection.laddr.port}"
                    )
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_local_run_listens_on_loopback_only(tmp_path):
    run = Training([*LONG_RAY_RUN, "--out", str(tmp_path / "run")])
    try:
        run.wait_for("forwardflow: run ")  # Ray, its agents and the stage actors are up
        time.sleep(3)  # Ray's agents and monitors open their ports in the background
        sockets = listening_sockets(run.process.pid)
        exposed = {
            name: [a for a in addresses if not is_loopback(a.rsplit(":", 1)[0])] for name, addresses in sockets.items()
        }
        assert sockets and not any(exposed.values()), exposed
        assert any("gcs_server" in name for name in sockets) and any("raylet" in name for name in sockets)
        run.process.send_signal(signal.SIGTERM)
        run.finish()
    finally:
        run.kill()
