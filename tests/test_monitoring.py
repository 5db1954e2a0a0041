"""Monitoring without a Prometheus server: the exporter's text format and metric names against the
dashboard, the committed dashboard JSON, the endpoint's default binding, the metrics log and the
PNG plots. (tests/test_monitoring_prometheus.py runs a real Prometheus.)"""

import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import small_config, small_sequence_config
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from forwardflow.launch.build import Run, build_run
from forwardflow.launch.train import main
from forwardflow.monitoring.dashboard import DASHBOARD_PATH, ROWS, dashboard_json, panel_queries
from forwardflow.monitoring.exporter import NON_FINITE_LOSS, PREFIX, RunInfo
from forwardflow.monitoring.observer import MetricsConfig, MetricsObserver
from forwardflow.monitoring.records import END, ERROR, EVALUATION, LOG_NAME, PROGRESS, read_log
from forwardflow.monitoring.report import PLOT_HEIGHT, PLOT_NAMES, PLOT_WIDTH
from forwardflow.monitoring.report import main as report_main
from forwardflow.monitoring.watch import free_port, prometheus_config
from forwardflow.monitoring.watch import main as watch_main
from forwardflow.pipeline.config import MonitoringConfig, OutputConfig
from forwardflow.pipeline.messages import NonFiniteLossError, StageStats
from forwardflow.pipeline.training import Progress, RunObserver

REPO = Path(__file__).resolve().parent.parent
# On the CPU on any machine: the tests must not need a GPU, nor behave differently where one is.
SHORT_RUN = ["--preset", "synthetic", "--executor", "sequential", "--device", "cpu", "--epochs", "2", "--no-progress"]


def observed_run(port: int = 0, out=None, base=None):
    """A tiny sequential run (``base``, or the synthetic one) watched by its metrics observer,
    collecting every 50 ms; returns the observer (its endpoint stopped) and the result."""
    config = replace(
        base or small_config(),
        monitoring=MonitoringConfig(progress=False, metrics_port=port, metrics_interval=0.05, metrics_linger=0),
        output=OutputConfig(None if out is None else str(out)),
    )
    with build_run(config, run_id="test-run") as run:
        observer = run.metrics
        result = run.train()
        if port:  # scrape before the run closes the endpoint
            with urllib.request.urlopen(observer.url, timeout=5) as response:
                observer.scraped = response.read().decode()
    return observer, result


def dashboard_metric_names() -> set[str]:
    board = json.loads(DASHBOARD_PATH.read_text())
    names = {name for _, expr in panel_queries(board) for name in re.findall(r"\bforwardflow_\w+", expr)}
    for variable in board["templating"]["list"]:
        names.update(re.findall(r"\bforwardflow_\w+", str(variable.get("query", ""))))
    return names


def test_committed_dashboard_is_what_the_generator_writes():
    assert DASHBOARD_PATH.read_text() == dashboard_json(), "run: python -m forwardflow.monitoring.dashboard"


def test_dashboard_has_the_panels_the_issue_asks_for_and_a_run_selector():
    board = json.loads(DASHBOARD_PATH.read_text())
    titles = {panel["title"] for panel in board["panels"]}
    for wanted in (
        "Throughput per stage",
        "Compute / wait / hand-on per stage",
        "Queued microbatches per stage and in flight",
        "Local loss per stage",
        "Accuracy over time",
        "Memory per device",
        "Actor restarts",
        "Errors",
    ):
        assert wanted in titles
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["run_id"]["query"] == "label_values(forwardflow_run_info, run_id)"
    queries = panel_queries(board)
    assert len(queries) == sum(len(spec.queries) for _, specs in ROWS for spec in specs)
    assert all('run_id=~"$run_id"' in expr for _, expr in queries)
    # Several runs may be chosen at once: a sum keeps them apart.
    groups = [group for _, expr in queries for group in re.findall(r"by \(([^)]*)\)", expr)]
    assert groups and all("run_id" in group for group in groups), groups


def test_exporter_serves_valid_text_format_with_every_metric_the_dashboard_names():
    # A classification run, and a run of the adding problem (a regression task, on sequence data):
    # between them they fill every series the dashboard shows.
    samples = set()
    for base in (None, small_sequence_config(dataset="adding")):
        observer, _ = observed_run(port=free_port(), base=base)
        text = observer.scraped
        families = list(text_string_to_metric_families(text))
        samples |= {sample.name for family in families for sample in family.samples}
        for family in families:
            assert family.name.startswith(PREFIX)
            for sample in family.samples:
                assert sample.labels["run_id"] == "test-run"
                if family.name.startswith(PREFIX + "stage_"):
                    assert {"stage", "device"} <= sample.labels.keys()
        promtool = shutil.which("promtool")  # Prometheus's own parser and naming linter (Debian prometheus)
        if promtool:
            lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert lint.returncode == 0, lint.stdout + lint.stderr
    missing = dashboard_metric_names() - samples
    assert not missing, f"the dashboard queries metrics the exporter does not serve: {missing}"


def test_a_sequence_run_exports_each_stages_time_step_and_its_test_mse():
    observer, result = observed_run(port=free_port(), base=small_sequence_config(dataset="adding"))
    registry = observer.exporter.registry

    def value(name, **labels):
        return registry.get_sample_value(PREFIX + name, {"run_id": "test-run", **labels})

    for stats in result.stages:
        stage = {"stage": str(stats.stage), "device": "cpu"}
        assert value("stage_time_step", **stage) == 8 and value("stage_sequence_length", **stage) == 8
        assert value("stage_updates_total", **stage) == stats.updates == 8 * 8  # 8 batches of 8 steps
        assert value("stage_samples_total", **stage) == 256  # sequences, counted once each
    assert value("test_mean_squared_error", predictor="head") == result.evaluations[-1].scores["head"]
    assert value("test_accuracy_ratio", predictor="head") is None


def test_exported_values_follow_the_run():
    observer, result = observed_run(port=free_port())
    registry = observer.exporter.registry

    def value(name, **labels):
        return registry.get_sample_value(PREFIX + name, {"run_id": "test-run", **labels})

    assert value("train_samples_total") == result.train_samples
    assert value("progress_ratio") == 1.0
    for stats in result.stages:
        stage = {"stage": str(stats.stage), "device": "cpu"}
        assert value("stage_samples_total", **stage) == stats.samples
        assert value("stage_compute_seconds_total", **stage) == pytest.approx(stats.busy_s)
        assert value("stage_wait_seconds_total", **stage) == 0.0  # sequential: never waits by construction
        assert value("stage_step_seconds_count", **stage) == stats.steps > 0
        assert value("stage_step_seconds_sum", **stage) == pytest.approx(stats.step_seconds)
        assert math.isfinite(value("stage_loss", **stage))
        assert 0.0 <= value("stage_train_accuracy_ratio", **stage) <= 1.0
        assert value("stage_memory_bytes", **stage) > 0
    assert value("test_accuracy_ratio", predictor="nearest_target") == result.evaluations[-1].accuracy
    assert value("errors_total", kind=NON_FINITE_LOSS) == 0


def test_an_error_is_counted_and_logged(tmp_path):
    observer, _ = observed_run(port=free_port(), out=tmp_path)
    observer.on_error(NonFiniteLossError(stage=1, microbatch=3, value=math.nan))
    assert (
        observer.exporter.registry.get_sample_value(
            PREFIX + "errors_total", {"run_id": "test-run", "kind": NON_FINITE_LOSS}
        )
        == 1
    )
    last = read_log(tmp_path / LOG_NAME)[-1]
    assert last.kind == ERROR and last.errors == {NON_FINITE_LOSS: 1}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def sample_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


class ScrapeAtFirstEvaluation(RunObserver):
    """Scrapes ``url`` once, mid-run: at the first of the run's evaluations."""

    def __init__(self, url: str):
        self.url = url
        self.text: str | None = None

    def on_evaluation(self, result, progress) -> None:
        if self.text is None:
            self.text = scrape(self.url)


def test_the_launcher_prints_the_metrics_url_at_start_and_it_answers_during_the_run(monkeypatch, capsys):
    port = free_port()
    seen = {}
    original_train = Run.train

    def train(self):  # what the launcher has printed when training starts, and a scrape mid-run
        seen["printed"] = capsys.readouterr().err
        url = re.search(r"^forwardflow: metrics on (\S+)$", seen["printed"], re.M)
        seen["scraper"] = ScrapeAtFirstEvaluation(url.group(1) if url else "http://unprinted")
        self.observers.append(seen["scraper"])
        return original_train(self)

    monkeypatch.setattr(Run, "train", train)
    assert main([*SHORT_RUN, "--metrics-port", str(port), "--metrics-linger", "0"]) == 0
    assert f"forwardflow: metrics on http://127.0.0.1:{port}/metrics\n" in seen["printed"]
    run_id = re.search(r"^forwardflow: run (\S+):", seen["printed"], re.M).group(1)
    text = seen["scraper"].text
    assert sample_value(text, "forwardflow_run_info", run_id=run_id) == 1.0
    assert 0 < sample_value(text, "forwardflow_progress_ratio", run_id=run_id) < 1  # answered mid-run


def test_by_default_a_scrape_after_the_training_loop_still_gets_the_final_accuracy(monkeypatch, tmp_path):
    # The default --metrics-linger keeps the endpoint up after the loop, so a Prometheus scraping
    # every few seconds still sees the final values. The scrape comes 1 s after the loop ended.
    port, out = free_port(), tmp_path / "run"
    late = {}
    original_train = Run.train

    def train(self):
        result = original_train(self)

        def scrape_later():
            time.sleep(1.0)
            try:
                late["text"] = scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError as error:
                late["error"] = error

        late["thread"] = threading.Thread(target=scrape_later)
        late["thread"].start()
        return result

    monkeypatch.setattr(Run, "train", train)
    assert main([*SHORT_RUN, "--metrics-port", str(port), "--out", str(out)]) == 0  # no --metrics-linger
    late["thread"].join()
    assert "error" not in late, late.get("error")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"][0]["test_accuracies"] != summary["test_accuracies"]  # the final ones differ
    assert sample_value(late["text"], "forwardflow_progress_ratio") == 1.0
    for predictor, accuracy in summary["test_accuracies"].items():
        assert sample_value(late["text"], "forwardflow_test_accuracy_ratio", predictor=predictor) == accuracy


def test_metrics_port_in_use_is_rejected_in_one_line_before_ray_or_overwrite(tmp_path, capsys, monkeypatch):
    import socket

    import forwardflow.actors.cluster

    kept = tmp_path / "kept"
    assert main([*SHORT_RUN, "--out", str(kept)]) == 0
    before = (kept / "summary.json").read_text()
    capsys.readouterr()
    monkeypatch.setattr(forwardflow.actors.cluster, "connect", lambda *a: pytest.fail("Ray started"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main([*SHORT_RUN, "--metrics-port", str(port), "--out", str(tmp_path / "run")]) == 2
        busy = ["--metrics-port", str(port), "--executor", "ray", "--out", str(kept), "--overwrite"]
        assert main([*SHORT_RUN, *busy]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(
        line.startswith("forwardflow: error: --metrics-port: cannot serve") for line in lines
    )
    assert not (tmp_path / "run").exists()
    assert (kept / "summary.json").read_text() == before


def test_plot_without_out_is_rejected_before_anything_runs(capsys):
    assert main([*SHORT_RUN, "--plot"]) == 2
    assert "--plot: needs --out" in capsys.readouterr().err


# The README's plot demo (with --out DIR added): long enough for some forty collections on this
# machine (the time it takes depends on the machine; the test below says so when it was too short).
PLOT_DEMO = ["--preset", "synthetic", "--epochs", "100", "--metrics-interval", "0.05", "--plot"]
DRAWN_PIXELS = 3000  # coloured pixels of a plot with data: a line across it, or bars (text is black)


def drawn_pixels(path: Path) -> int:
    """Pixels in colour (lines, markers, bars), as against the black text and grey grid of a plot
    without data."""
    with Image.open(path) as image:
        assert image.size == (PLOT_WIDTH, PLOT_HEIGHT)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    return int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())


def test_the_plot_demo_keeps_a_metrics_log_and_draws_plots_with_data(ray_cluster, tmp_path):
    out = tmp_path / "run"
    assert main([*PLOT_DEMO, "--no-progress", "--out", str(out)]) == 0
    records = read_log(out / LOG_NAME)
    kinds = [record.kind for record in records]
    assert kinds[0] == PROGRESS and kinds[-1] == END and kinds.count(EVALUATION) == 100
    assert kinds.count(PROGRESS) >= 20, f"{kinds.count(PROGRESS)} collections: the demo ran too fast to plot"
    assert len({record.run_id for record in records}) == 1
    assert records[-1].progress == 1.0 and records[-1].stages
    evaluation = next(record for record in records if record.kind == EVALUATION)
    assert 0.0 <= evaluation.test_accuracy["nearest_target"] <= 1.0
    drawn = {name: drawn_pixels(out / name) for name in PLOT_NAMES}
    assert all(count >= DRAWN_PIXELS for count in drawn.values()), drawn
    # The stand-alone command draws the same plots from the log of an existing run.
    for name in PLOT_NAMES:
        (out / name).unlink()
    assert report_main([str(out)]) == 0
    assert {name: drawn_pixels(out / name) for name in PLOT_NAMES} == drawn
    assert report_main([str(tmp_path / "missing")]) == 2


def test_a_plot_without_data_is_told_from_one_with_data(tmp_path):
    # The blank check above against what a run too short to collect draws (the former demo): with
    # only the first collection and the end of the run, the throughput plot has no stage line.
    out = tmp_path / "run"
    assert main([*SHORT_RUN, "--epochs", "1", "--metrics-interval", "3600", "--out", str(out), "--plot"]) == 0
    assert drawn_pixels(out / "throughput.png") < DRAWN_PIXELS <= drawn_pixels(out / "time_split.png")


@pytest.mark.parametrize("line", ["{}", "null", '{"run_id": "r", "stages": null, "colour": 1}'])
def test_a_metrics_log_line_that_is_no_record_is_named_in_one_line(tmp_path, capsys, line):
    (tmp_path / LOG_NAME).write_text(line + "\n")
    assert report_main([str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"forwardflow: error: {tmp_path / LOG_NAME}"), lines


def test_watch_config_is_valid_for_prometheus(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    generated = tmp_path / "prometheus.yml"
    generated.write_text(prometheus_config(("127.0.0.1:9400", "127.0.0.1:9401"), "2s"))
    for path in (generated, REPO / "monitoring" / "prometheus.yml"):
        check = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


# Serves the endpoint the way the launcher does (the command line's settings, the run's metrics
# observer), once with the default host and once with --metrics-host 0.0.0.0, and tries to connect to
# each on the addresses given.
PROBE = r"""
import json, socket, sys
from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.monitoring.watch import free_port

found = {}
for extra in ([], ["--metrics-host", "0.0.0.0"]):
    config = parse_config(["--preset", "synthetic", "--no-progress", "--executor", "sequential", "--device", "cpu",
                           "--metrics-port", str(free_port()), "--metrics-linger", "0"] + extra)
    with build_run(config) as run:
        for address in sys.argv[1:]:
            try:
                socket.create_connection((address, run.metrics.port), timeout=2).close()
                reached = True
            except OSError:
                reached = False
            found[f"{config.monitoring.metrics_host} {address}"] = reached
print(json.dumps(found))
"""
NAMESPACE_ADDRESS = "10.200.0.1"  # exists only inside the test's own network namespace


def probe(addresses: list[str], in_namespace: bool) -> dict[str, bool] | None:
    command = [sys.executable, "-c", PROBE, *addresses]
    if in_namespace:
        if not shutil.which("unshare") or not shutil.which("ip"):
            return None
        setup = f'ip link set lo up && ip addr add {NAMESPACE_ADDRESS}/32 dev lo && exec "$@"'
        command = ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", setup, "probe", *command]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        if in_namespace:
            return None  # no network namespace here: the loopback-only check below still runs
        raise AssertionError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_endpoint_is_not_reachable_on_a_non_loopback_address_by_default():
    # A non-loopback address of our own: 10.200.0.1 in a private network namespace that the test
    # makes, so no traffic leaves it. Where namespaces are not allowed, 127.0.0.2 (another local
    # address, refused by the same rule: a socket bound to 127.0.0.1 accepts only 127.0.0.1).
    found = probe(["127.0.0.1", NAMESPACE_ADDRESS], in_namespace=True)
    other = NAMESPACE_ADDRESS
    if found is None:
        found, other = probe(["127.0.0.1", "127.0.0.2"], in_namespace=False), "127.0.0.2"
    assert found["127.0.0.1 127.0.0.1"] is True  # it serves, on loopback
    assert found[f"127.0.0.1 {other}"] is False  # and nowhere else by default
    assert found[f"0.0.0.0 {other}"] is True  # --metrics-host opens it (the probe can see it)


def test_ray_pipeline_reports_queues_and_the_time_split_without_draining(ray_cluster, tiny):
    run = tiny(execution=replace(small_config("ray").execution, window=8))
    setups = run.setups
    with run:
        pipeline = run.executor
        # 6: whole calls of 2 microbatches (window 8, 3 stages), all sent without a drain.
        assert pipeline.per_call == 2
        for mb in itertools.islice(iter(run.schedule), 6):
            pipeline.submit(mb)
        assert pipeline.in_flight == 6
        backlog = pipeline.stage_backlog()
        assert len(backlog) == len(setups) and 0 <= sum(backlog) <= 6
        # As the stages finish, their queues empty while the predictions wait for the driver.
        deadline = time.monotonic() + 60
        while sum(pipeline.stage_backlog()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipeline.stage_backlog() == [0] * len(setups)
        assert pipeline.in_flight == 6
        assert len(pipeline.completed()) == 6 and pipeline.in_flight == 0
        stats = pipeline.snapshots()
        assert all(s.microbatches == 6 and s.handoff_s > 0 and s.wait_s > 0 for s in stats)


class StatsFeed:
    """An executor that only hands the observer the stage statistics it is given."""

    def __init__(self, rounds: list[list[StageStats]]):
        self.rounds = rounds
        self.in_flight = 0

    def poll_snapshots(self) -> list[StageStats]:
        return self.rounds.pop(0)

    def stage_backlog(self) -> list[int]:
        return [0]


def test_a_stages_train_accuracy_stands_through_an_interval_without_training(tmp_path):
    # A sequence's steps before its last, or an evaluation pass, score no training microbatch: the
    # series keeps the latest accuracy instead of a gap (as the loss keeps its latest value).
    trained = StageStats(stage=0, device="cpu", samples=64, train_correct=48, train_scored=64, last_loss=0.5)
    later = replace(trained, microbatches=9)
    settings = MonitoringConfig(progress=False, metrics_interval=0.05)
    info = RunInfo("run", "synthetic", "sigprop", "fc", "sequential", stages=1, epochs=1)
    observer = MetricsObserver(MetricsConfig(settings=settings, info=info, devices=("cpu",), out=str(tmp_path)))
    feed = StatsFeed([[trained], [later]])
    for _ in range(2):
        observer.after_submit(feed, Progress())
        time.sleep(0.06)
    records = read_log(tmp_path / LOG_NAME)
    assert [record.stages[0].train_accuracy for record in records] == [0.75, 0.75]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--host", "nosuchhost.invalid"], "forwardflow: error: --host: cannot listen on nosuchhost.invalid"),
        (["--data-dir", "/etc/passwd"], "forwardflow: error: --data-dir: cannot use /etc/passwd"),
    ],
    ids=["unknown host", "a file as the data folder"],
)
def test_watch_refuses_a_host_or_folder_it_cannot_use_in_one_line(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its temporary directory would go
    assert watch_main(["--no-grafana", "--prometheus", sys.executable, *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not list(tmp_path.iterdir()), "nothing left behind"
