"""A real Prometheus (Debian package ``prometheus``, installed by launch/setup.sh) on a free
loopback port scrapes a short real training run on the Ray executor; every query of every
dashboard panel, evaluated through Prometheus's HTTP API, returns data. ``monitoring.watch``, run
as a user runs it, stops its Prometheus and removes its temporary directory on Ctrl-C and SIGTERM."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.monitoring.dashboard import DASHBOARD_PATH, REGRESSION_SERIES, panel_queries
from forwardflow.monitoring.records import LOG_NAME, PROGRESS
from forwardflow.monitoring.watch import free_port, prometheus_config, start_prometheus, stop, wait_ready

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# The dashboard's Grafana variables, as Grafana would fill them in for a range covering the run.
WINDOW = "2m"
SCRAPE_INTERVAL = "200ms"


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(base: str, promql: str, timeout_s: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(base, promql)
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"Prometheus never answered {promql!r} within {timeout_s:g} s")


def wait_for_target(base: str, timeout_s: float = 20.0) -> None:
    """Prometheus hands new targets to its scrapers in batches, up to 5 s after it starts: a run
    that began before would be scraped only after it ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10) as response:
            if any(t["labels"].get("job") == "forwardflow" for t in json.load(response)["data"]["activeTargets"]):
                return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus did not take up the target within {timeout_s:g} s")


def finite_values(result: list[dict]) -> list[float]:
    return [float(item["value"][1]) for item in result if math.isfinite(float(item["value"][1]))]


def test_every_dashboard_panel_query_returns_data_from_a_real_prometheus(ray_cluster, tmp_path):
    if not shutil.which(PROMETHEUS):
        pytest.skip("prometheus (Debian package) is not installed: bash launch/setup.sh installs it")
    metrics_port, prometheus_port = free_port(), free_port()
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(prometheus_config((f"127.0.0.1:{metrics_port}",), SCRAPE_INTERVAL))
    (tmp_path / "data").mkdir()
    prometheus = start_prometheus(config_file, tmp_path / "data", "127.0.0.1", prometheus_port, PROMETHEUS)
    base = f"http://127.0.0.1:{prometheus_port}"
    try:
        wait_ready(base + "/-/ready", prometheus)
        wait_for_target(base)
        # Rates need values that change between scrapes: the run must span many scrapes (30 epochs:
        # about 4 s on two cores, some 20 scrapes).
        config = parse_config(
            [
                "--preset",
                "synthetic",
                "--executor",
                "ray",
                "--device",
                "cpu",
                "--epochs",
                "30",
                "--no-progress",
                "--metrics-port",
                str(metrics_port),
                "--metrics-interval",
                "0.25",
                "--metrics-linger",
                "0",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        with build_run(config) as built:  # the endpoint serves until the block ends
            result = built.train()
            check_every_panel(base, built.run_id, result, tmp_path)
    finally:
        stop(prometheus)


def check_every_panel(base: str, run_id: str, result, tmp_path) -> None:
    run = f'run_id="{run_id}"'
    # The endpoint still serves the final values (as with --metrics-linger): wait for their scrape.
    wait_for(base, f"forwardflow_progress_ratio{{{run}}} == 1")
    # rate() and increase() need two samples of a series: a run faster than two scrapes leaves
    # one from its stage counters, so wait for a later scrape of the final values.
    for series in ("forwardflow_stage_samples_total", "forwardflow_stage_step_seconds_count"):
        wait_for(base, f"min(count_over_time({series}{{{run}}}[{WINDOW}])) >= 2")

    # The Ray executor measures the whole time split, and the pipeline did overlap stages.
    assert all(stats.wait_s > 0 and stats.handoff_s > 0 for stats in result.stages)
    # Microbatches were in flight at the collections taken while training. (Checked in the
    # metrics log, not through a scrape: a 1 s scrape can fall wholly outside a short run.)
    records = [json.loads(line) for line in (tmp_path / "run" / LOG_NAME).read_text().splitlines()]
    assert max(record["in_flight"] for record in records if record["kind"] == PROGRESS) > 0
    # The run selector's query.
    with urllib.request.urlopen(f"{base}/api/v1/label/run_id/values?match[]=forwardflow_run_info") as response:
        assert run_id in json.load(response)["data"]

    queries = panel_queries(json.loads(DASHBOARD_PATH.read_text()))
    assert len(queries) >= 15
    # A classification run fills every series but the regression tasks' score, whose export a run
    # of the adding problem checks (tests/test_monitoring.py).
    queries = [(title, expr) for title, expr in queries if not any(name in expr for name in REGRESSION_SERIES)]
    empty = []
    for title, expr in queries:
        promql = expr.replace("$run_id", run_id).replace("$__rate_interval", WINDOW).replace("$__range", WINDOW)
        if not finite_values(query(base, promql)):
            empty.append(f"{title}: {promql}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once ``pid`` has exited and been reaped (no /proc entry, or only a zombie's)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_watch_stops_its_prometheus_and_removes_its_directory_when_stopped(tmp_path, stop_signal):
    if not shutil.which(PROMETHEUS):
        pytest.skip("prometheus (Debian package) is not installed: bash launch/setup.sh installs it")
    scratch = tmp_path / "tmp"  # the watcher's temporary directory goes here (TMPDIR)
    scratch.mkdir()
    command = [sys.executable, "-m", "forwardflow.monitoring.watch", "--no-grafana", "--prometheus", PROMETHEUS]
    # The watcher gets Ctrl-C as from a terminal even when this test runs as a shell's background
    # job, which ignores SIGINT (an ignored signal stays ignored in children; a handled one is
    # reset to the default at exec, where Python installs its own).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    watch = subprocess.Popen(
        [*command, "--target", f"127.0.0.1:{free_port()}"],
        cwd=tmp_path,  # the documented module path works from anywhere, not only from the checkout
        env=dict(os.environ, TMPDIR=str(scratch)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    signal.signal(signal.SIGINT, inherited)
    prometheus = None
    try:
        assert watch.stdout is not None
        started = [watch.stdout.readline(), watch.stdout.readline()]
        assert started[1].startswith("Ctrl-C"), "".join(started) + watch.stderr.read()  # type: ignore[union-attr]
        url = re.match(r"Prometheus: (\S+) ", started[0]).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(url + "/-/ready", timeout=10) as response:
            assert response.status == 200
        (prometheus,) = children(watch.pid)
        assert len(list(scratch.iterdir())) == 1  # its working directory
        watch.send_signal(stop_signal)
        assert watch.wait(timeout=30) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        stray = prometheus is not None and not gone(prometheus)
        if stray:
            os.kill(prometheus, signal.SIGKILL)  # type: ignore[arg-type]
    assert not stray, "Prometheus outlived the watcher"
    assert list(scratch.iterdir()) == [], "the temporary directory was left behind"
