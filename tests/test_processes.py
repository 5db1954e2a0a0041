"""Real processes: ``launch/train.py`` as a user starts it. A local run listens on loopback only;
SIGTERM (or Ctrl-C, to the whole process group) stops it at a checkpoint in one line, with Ray
shut down, and ``--resume`` finishes it with the weights of a run never stopped; a full disk
stops it in one line with its last checkpoint intact."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import assert_same_weights, run_to_end

from forwardflow.launch.cli import parse_config
from forwardflow.launch.train import main
from forwardflow.monitoring.watch import free_port
from forwardflow.pipeline.checkpoint import CHECKPOINTS, complete_checkpoints, verify

REPO = Path(__file__).resolve().parent.parent
SETTINGS = ["--preset", "synthetic", "--epochs", "400", "--no-progress"]


class Training:
    """``python launch/train.py ARGV`` in a process of its own; stderr collected line by line."""

    def __init__(self, argv: list[str], **popen):
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "train.py"), *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, ready, what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, f"exited {self.process.returncode}: {self.lines}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s: {self.lines}"
            time.sleep(0.01)

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


def checkpointed(out: Path):
    return lambda: bool(complete_checkpoints(out / CHECKPOINTS))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def listening_sockets(processes: list[psutil.Process]) -> dict[str, list[str]]:
    """Every listening TCP socket and bound UDP socket of ``processes``."""
    found: dict[str, list[str]] = {}
    for process in processes:
        try:
            name = f"{process.pid} {' '.join(process.cmdline())[:100] or process.name()}"
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN or connection.type == 2:  # SOCK_DGRAM
                    found.setdefault(name, []).append(f"{connection.laddr.ip}:{connection.laddr.port}")
        except psutil.NoSuchProcess:
            continue
    return found


def resumed_matches_uninterrupted(out: Path, settings: list[str]) -> None:
    """``--resume OUT`` (in this process, sequentially) ends with an uninterrupted run's weights."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["--resume", str(out), "--executor", "sequential"])
    assert status == 0, err.getvalue()
    expected = run_to_end(parse_config([*settings, "--executor", "sequential"]))
    assert_same_weights(expected.weights, torch.load(out / "weights.pt"))


def test_a_local_run_listens_on_loopback_only_and_sigterm_stops_it_at_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    settings = ["--preset", "synthetic", "--epochs", "20", "--no-progress"]
    run = Training([*settings, "--executor", "ray", "--checkpoint-every", "2", "--out", str(out)])
    try:
        run.wait_for(checkpointed(out), "first checkpoint")
        time.sleep(1)  # Ray's agents and monitors open their ports in the background
        started = [psutil.Process(run.process.pid), *psutil.Process(run.process.pid).children(recursive=True)]
        sockets = listening_sockets(started)
        exposed = {name: [a for a in found if not is_loopback(a.rsplit(":", 1)[0])] for name, found in sockets.items()}
        assert not any(exposed.values()), exposed
        assert any("gcs_server" in name for name in sockets) and any("raylet" in name for name in sockets)
        run.process.send_signal(signal.SIGTERM)
        assert run.finish() == 143, run.lines
    finally:
        run.kill()
    assert not [line for line in run.lines if "Traceback" in line or "SIGTERM received" in line], run.lines
    ours = run.ours()  # the start line, the placement of each stage, the stop line
    first, last = ours[0], ours[-1]
    assert first.startswith("forwardflow: run ") and last.startswith("forwardflow: stopped by SIGTERM; "), run.ours()
    assert last.endswith(f"continue with: python launch/train.py --resume {out}")
    assert_all_end(started[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGTERM"
    resumed_matches_uninterrupted(out, settings)


def assert_all_end(processes: list[psutil.Process], within_s: float = 30) -> None:
    """Ray's processes of a run end with it (they may take a moment after the driver exits)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and [p for p in processes if alive(p)]:
        time.sleep(0.2)
    assert not [p.pid for p in processes if alive(p)], "Ray's processes outlived the run"


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ctrl_c_to_the_process_group_stops_at_a_checkpoint_and_resume_ends_identically(tmp_path):
    out = tmp_path / "run"
    settings = ["--preset", "synthetic", "--epochs", "10", "--no-progress"]
    run = Training([*settings, "--executor", "sequential", "--out", str(out)], start_new_session=True)
    try:
        run.wait_for(checkpointed(out), "first checkpoint")
        os.killpg(run.process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C
        assert run.finish() == 130, run.lines
    finally:
        run.kill()
    assert len(run.ours()) == 2 and run.ours()[1].startswith("forwardflow: stopped by SIGINT; "), run.lines
    assert not [line for line in run.lines if "Traceback" in line]
    resumed_matches_uninterrupted(out, settings)


def test_sigterm_to_the_whole_process_group_of_a_ray_run_stops_it_at_a_checkpoint(tmp_path):
    # As `timeout`, `kill -TERM -PGID` or a batch scheduler stopping a job send it: Ray's own
    # processes must not die with the driver's group, or the driver loses Ray while it stops.
    out = tmp_path / "run"
    settings = ["--preset", "synthetic", "--epochs", "20", "--no-progress"]
    run = Training(
        [*settings, "--executor", "ray", "--checkpoint-every", "2", "--out", str(out)], start_new_session=True
    )
    try:
        run.wait_for(checkpointed(out), "first checkpoint")
        ray_processes = psutil.Process(run.process.pid).children(recursive=True)
        assert any("gcs_server" in p.name() for p in ray_processes)
        os.killpg(run.process.pid, signal.SIGTERM)
        assert run.finish() == 143, run.lines
    finally:
        run.kill()
    assert run.ours()[-1].startswith("forwardflow: stopped by SIGTERM; "), run.lines
    assert not [line for line in run.lines if "Traceback" in line or "GCS" in line], run.lines
    assert_all_end(ray_processes)
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


def test_a_second_signal_exits_at_once(tmp_path):
    out = tmp_path / "run"
    run = Training([*SETTINGS, "--executor", "sequential", "--out", str(out)], start_new_session=True)
    try:
        run.wait_for(checkpointed(out), "first checkpoint")
        os.killpg(run.process.pid, signal.SIGINT)
        os.killpg(run.process.pid, signal.SIGINT)
        assert run.finish(timeout_s=10) == 130, run.lines
    finally:
        run.kill()
    assert not [line for line in run.lines if "Traceback" in line]
    assert len(run.ours()) == 2 and "SIGINT" in run.ours()[1], run.lines


def no_file_may_grow() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no core dump


def test_a_full_disk_stops_the_run_in_one_line_and_leaves_the_last_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    settings = ["--preset", "synthetic", "--epochs", "10", "--no-progress"]
    run = Training([*settings, "--executor", "sequential", "--out", str(out)], preexec_fn=no_file_may_grow)
    try:
        run.wait_for(checkpointed(out), "first checkpoint")
        # From now on no file of the run can grow past 1 KiB: the disk is full.
        resource.prlimit(run.process.pid, resource.RLIMIT_FSIZE, (1024, 1024))
        assert run.finish() == 1, run.lines
    finally:
        run.kill()
    assert len(run.ours()) == 2, run.lines
    assert "error: cannot write" in run.ours()[1] and "(File too large)" in run.ours()[1], run.ours()
    assert run.ours()[1].endswith(f"continue with: python launch/train.py --resume {out}")
    assert not [line for line in run.lines if "Traceback" in line]
    folder, manifest = complete_checkpoints(out / CHECKPOINTS)[-1]
    verify(folder, manifest)
    assert not [p.name for p in out.rglob(".*")], "no temporary file left behind"
    resumed_matches_uninterrupted(out, settings)


SIGTERM_WHILE_STARTING = """
import os, signal, sys
from forwardflow.actors import ray_pipeline
from forwardflow.launch.train import main
from forwardflow.monitoring.watch import free_port

reserve = ray_pipeline.StageGroup

def reserved_then_signalled(placements):  # the stages' start can take minutes on a cluster
    group = reserve(placements)
    os.kill(os.getpid(), signal.SIGTERM)
    return group

ray_pipeline.StageGroup = reserved_then_signalled
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_the_stages_start_stops_in_one_line(tmp_path):
    # ray.init puts in its own SIGTERM handler, which exits with status 15 and a C++ stack dump.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_STARTING, "--preset", "synthetic", "--executor", "ray", "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 143, done.stderr[-3000:]
    assert lines == ["forwardflow: stopped by SIGTERM before training started"], lines


def files_up_to(kib: int):
    def limit() -> None:
        no_file_may_grow()
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))

    return limit


@pytest.mark.parametrize(
    "flags, kib, name",
    [([], 12, "weights.pt"), (["--plot"], 30, ".png")],
    ids=["weights", "plots"],
)
def test_a_full_disk_at_the_end_of_a_run_is_one_line_naming_the_file(tmp_path, flags, kib, name):
    # torch.save reports a full disk as a RuntimeError, and matplotlib writes its file itself.
    if flags:
        pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    argv = ["--preset", "synthetic", "--executor", "sequential", "--epochs", "1", "--no-progress", "--no-checkpoints"]
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *argv, *flags, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=files_up_to(kib),
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("forwardflow: error: cannot write") and name in errors[0], errors
    assert "(File too large)" in errors[0], errors
    assert not [p.name for p in out.rglob(".*")], "no temporary file left behind"


def test_a_finished_runs_outputs_are_written_before_its_metrics_linger_which_a_signal_ends(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "synthetic", "--executor", "sequential", "--epochs", "1", "--no-progress"]
    run = Training([*argv, "--metrics-port", str(free_port()), "--metrics-linger", "600", "--out", str(out)])
    try:
        run.wait_for(lambda: any("--metrics-linger" in line for line in run.lines), "linger")
        assert (out / "summary.json").is_file() and (out / "weights.pt").is_file()
        run.process.send_signal(signal.SIGTERM)
        assert run.finish(timeout_s=20) == 0, run.lines  # the run had completed: a success, cut short
    finally:
        run.kill()
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
