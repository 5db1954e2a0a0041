"""Watch a running job: start Prometheus (Debian package ``prometheus``) on loopback, scraping the
trainer's metrics endpoint and Ray's own metrics where Ray exports them; where Grafana is
installed, provision it (datasource + the forwardflow dashboard) and start it on loopback too.

    python launch/train.py --metrics-port 9400 ... &
    python -m forwardflow.monitoring.watch --target 127.0.0.1:9400

Runs until Ctrl-C, SIGTERM (``kill``) or ``--for SECONDS``, then stops what it started and removes
its temporary directory. Nothing listens on a non-loopback address unless ``--host`` says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MONITORING = Path(__file__).parent
PROVISIONING = MONITORING / "grafana" / "provisioning"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
# Ray's head node writes its metrics agents' addresses here when its dashboard runs.
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
DEFAULT_TARGET = "127.0.0.1:9400"


@dataclass(frozen=True)
class WatchConfig:
    targets: tuple[str, ...]
    host: str = "127.0.0.1"
    prometheus_port: int = 0  # 0: a free port
    grafana_port: int = 0
    scrape_interval: str = "2s"
    ray_sd_file: str = RAY_SD_FILE

    def __post_init__(self):
        if not self.targets:
            raise ValueError("--target: at least one HOST:PORT to scrape")
        for target in self.targets:
            host, _, port_text = target.rpartition(":")
            if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"--target: {target!r} is not HOST:PORT")
        for name, port in (("--prometheus-port", self.prometheus_port), ("--grafana-port", self.grafana_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}: must be 0 (a free port) to 65535 (got {port})")
        if not self.scrape_interval[:-1].isdigit() or self.scrape_interval[-1] not in "sm":
            raise ValueError(f"--scrape-interval: {self.scrape_interval!r} is not like 2s or 1m")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def prometheus_config(targets: tuple[str, ...], scrape_interval: str, ray_sd_file: str = RAY_SD_FILE) -> str:
    """The Prometheus configuration (YAML; scalars quoted the JSON way, which YAML reads)."""
    quoted = ", ".join(json.dumps(target) for target in targets)
    return (
        f"global:\n"
        f"  scrape_interval: {scrape_interval}\n"
        f"  evaluation_interval: {scrape_interval}\n"
        f"scrape_configs:\n"
        f"  - job_name: forwardflow\n"
        f"    static_configs:\n"
        f"      - targets: [{quoted}]\n"
        f"  # Ray's own metrics, from the agents its head node lists (absent: nothing scraped).\n"
        f"  - job_name: ray\n"
        f"    file_sd_configs:\n"
        f"      - files: [{json.dumps(ray_sd_file)}]\n"
    )


def start_prometheus(
    config_file: Path, data_dir: Path, host: str, port: int, binary: str = "prometheus"
) -> subprocess.Popen:
    command = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={host}:{port}",
        "--log.level=warn",
    ]
    with open(data_dir.parent / "prometheus.log", "ab") as log:  # the child keeps its own handle
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Wait until ``url`` answers 200; raises RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]!s} exited with status {process.returncode}")  # type: ignore[index]
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


def find_grafana() -> list[str] | None:
    """The command that starts Grafana's server, where Grafana is installed."""
    grafana, server = shutil.which("grafana"), shutil.which("grafana-server")
    if grafana:
        return [grafana, "server"]
    return [server] if server else None


def grafana_home(command: list[str]) -> Path:
    """Grafana's installation directory (its web assets): /usr/share/grafana for the packages,
    the directory above bin/ for an unpacked release."""
    packaged = Path("/usr/share/grafana")
    return packaged if packaged.is_dir() else Path(command[0]).resolve().parent.parent


def grafana_ini(work: Path, host: str, port: int) -> str:
    return (
        f"[server]\nhttp_addr = {host}\nhttp_port = {port}\n"
        f"[paths]\ndata = {work / 'grafana-data'}\nlogs = {work / 'grafana-logs'}\n"
        f"plugins = {work / 'grafana-plugins'}\nprovisioning = {PROVISIONING}\n"
        # Read-only viewing without a login; editing still needs the admin login (admin/admin).
        f"[auth.anonymous]\nenabled = true\norg_role = Viewer\n"
        f"[analytics]\nreporting_enabled = false\ncheck_for_updates = false\n"
    )


def start_grafana(command: list[str], work: Path, host: str, port: int, prometheus_url: str) -> subprocess.Popen:
    ini = work / "grafana.ini"
    ini.write_text(grafana_ini(work, host, port))
    # The provisioning files read these (Grafana expands $VARIABLES in them).
    env = dict(os.environ, FORWARDFLOW_PROMETHEUS_URL=prometheus_url, FORWARDFLOW_DASHBOARDS=str(DASHBOARDS))
    with open(work / "grafana.log", "ab") as log:
        return subprocess.Popen(
            [*command, f"--homepath={grafana_home(command)}", f"--config={ini}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def parse(argv: list[str] | None) -> tuple[WatchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m forwardflow.monitoring.watch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--target",
        action="append",
        help=f"the trainer's metrics endpoint, HOST:PORT (repeatable; default {DEFAULT_TARGET})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address Prometheus and Grafana bind to")
    parser.add_argument("--prometheus-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--grafana-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--scrape-interval", default="2s")
    parser.add_argument("--ray-sd-file", default=RAY_SD_FILE, help="Ray's Prometheus service-discovery file")
    parser.add_argument(
        "--data-dir", help="keep Prometheus's data (and Grafana's) here; default: a temporary directory removed at exit"
    )
    parser.add_argument("--no-grafana", action="store_true", help="start Prometheus only")
    parser.add_argument("--prometheus", default="prometheus", help="the Prometheus binary")
    parser.add_argument("--for", dest="duration", type=float, help="stop after this many seconds")
    args = parser.parse_args(argv)
    config = WatchConfig(
        targets=tuple(args.target or [DEFAULT_TARGET]),
        host=args.host,
        prometheus_port=args.prometheus_port,
        grafana_port=args.grafana_port,
        scrape_interval=args.scrape_interval,
        ray_sd_file=args.ray_sd_file,
    )
    return config, args


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: raise what Ctrl-C raises, so that both take the same way out (the
    ``finally`` that stops the servers and removes the temporary directory)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = parse(argv)
    except ValueError as error:
        print(f"forwardflow: error: {error}", file=sys.stderr)
        return 2
    if not shutil.which(args.prometheus):
        print(
            f"forwardflow: error: {args.prometheus} not found: install the Debian package prometheus "
            f"(bash launch/setup.sh does)",
            file=sys.stderr,
        )
        return 2
    try:
        work = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="forwardflow-watch-"))
        (work / "prometheus-data").mkdir(parents=True, exist_ok=True)
        config_file = work / "prometheus.yml"
        config_file.write_text(prometheus_config(config.targets, config.scrape_interval, config.ray_sd_file))
    except OSError as error:
        print(
            f"forwardflow: error: --data-dir: cannot use {args.data_dir} ({error.strerror or error})", file=sys.stderr
        )
        return 2
    try:
        prometheus_port = config.prometheus_port or free_port(config.host)
    except OSError as error:  # no such host, or not an address of this machine
        print(
            f"forwardflow: error: --host: cannot listen on {config.host} ({error.strerror or error})", file=sys.stderr
        )
        if not args.data_dir:
            shutil.rmtree(work, ignore_errors=True)
        return 2
    prometheus_url = f"http://{config.host}:{prometheus_port}"
    processes = []
    failed = False  # then the temporary directory stays: its logs are what the error points to
    signal.signal(signal.SIGTERM, interrupt)
    try:
        processes.append(
            start_prometheus(config_file, work / "prometheus-data", config.host, prometheus_port, args.prometheus)
        )
        wait_ready(prometheus_url + "/-/ready", processes[-1])
        print(
            f"Prometheus: {prometheus_url} (scraping {', '.join(config.targets)} every "
            f"{config.scrape_interval}; config {config_file})"
        )
        grafana = None if args.no_grafana else find_grafana()
        if grafana:
            grafana_port = config.grafana_port or free_port(config.host)
            processes.append(start_grafana(grafana, work, config.host, grafana_port, prometheus_url))
            grafana_url = f"http://{config.host}:{grafana_port}"
            wait_ready(grafana_url + "/api/health", processes[-1], timeout_s=60)
            print(f"Grafana: {grafana_url}/d/forwardflow-training (provisioned; log in as admin/admin to edit)")
        elif not args.no_grafana:
            print(
                "Grafana is not installed: use Prometheus's own graphs, or import "
                f"{DASHBOARDS / 'forwardflow.json'} into a Grafana you have (see the README)"
            )
        print("Ctrl-C (or SIGTERM) stops them.", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            if any(process.poll() is not None for process in processes):
                print(f"forwardflow: error: a server stopped; see the logs in {work}", file=sys.stderr)
                failed = True
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except RuntimeError as error:
        print(f"forwardflow: error: {error}; see the logs in {work}", file=sys.stderr)
        failed = True
        return 1
    finally:
        for process in reversed(processes):
            stop(process)
        if not args.data_dir and not failed:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
