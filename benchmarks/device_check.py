"""The device check: is the GPU kept busy? One script for a GPU machine that has torch and numpy only.

    python3 benchmarks/device_check.py [--seconds 50] [--output benchmarks/results/device.md]
    python3 benchmarks/device_check.py --tiny --output /tmp/device.md     # on a CPU, in seconds

Four runs of about ``--seconds`` each (the whole check stays under 8 minutes on one GPU), on the
cifar-vgg preset's net (VGG7, microbatch 128, the preset's bf16, channels-last and copy streams):

1. Signal Propagation, sequential runner (7 stages in this process);
2. Signal Propagation through Ray, 2 stages sharing the GPU, activations handed on as
   ``--transport auto`` chooses (CUDA IPC on a shared GPU), and the same through the object store
   (skipped, with a line saying so, when Ray cannot be imported: ../shared/gpu/README.md says how
   to carry a slim Ray);
3. ``--rule bp``, sequential (end-to-end backpropagation through one stage);
4. a plain PyTorch backprop loop on the same net, data and augmentation on the GPU.

Each forwardflow run goes through the builder, as ``launch/train.py`` runs; its size comes from a
short calibration run, which also profiles 20 of its microbatches (benchmarks/device_profile.py:
host time per microbatch, torch's operators within it, device time; the operator tables go to
``<output>-profile.md``). Reported: training samples/s, each stage's busy share (device time on a
GPU), GPU utilisation (``torch.cuda.utilization``, else ``nvidia-smi``) and peak memory. The
sequential runs' steady state (after 20 microbatches) runs under
``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation other than the run's sanctioned
reads (``pipeline/device.py: host_read``) stops the run, and the report shows where it was.

A run that raises becomes a row saying why, and the check goes on (exit status 1 at the end); the
report is rewritten after each run, so a check cut short by the machine's time limit leaves the rows
it finished. ``benchmarks/gpu_session.sh run`` runs this check, then the test suite, on a bare GPU
machine in one call.

Data (benchmarks/device_data.py): the CIFAR-10 JPEG copy (../shared/datasets/cifar10-jpeg75.tar.gz,
decoded with Pillow or torchvision, whichever is there), else synthetic images of the same shape
(said in the report).

Without an install of forwardflow (the GPU machine takes a plain checkout), the script lays out a
``forwardflow`` package of links to the four folders in a temporary folder and puts it on
``sys.path`` and ``PYTHONPATH`` (Ray's workers inherit it); ``--plain-checkout`` forces that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "actors", "launch", "monitoring")
WARMUP_MICROBATCHES = 20  # before the sync debug mode is armed: allocations, cuDNN's first calls


def importable_forwardflow(force: bool = False) -> str:
    """Where ``forwardflow`` is imported from; lays out the package of links when needed."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the benchmarks package
    if not force:
        try:
            import forwardflow.pipeline

            return str(Path(forwardflow.pipeline.__file__).parent.parent)
        except ImportError:
            pass
    root = Path(tempfile.mkdtemp(prefix="forwardflow-package-"))
    (root / "forwardflow").mkdir()
    for package in PACKAGES:
        (root / "forwardflow" / package).symlink_to(REPO / package, target_is_directory=True)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(REPO), os.environ.get("PYTHONPATH")]))
    import forwardflow.pipeline

    return str(Path(forwardflow.pipeline.__file__).parent.parent)


# ---------------------------------------------------------------- measuring


class Utilisation(threading.Thread):
    """Samples the GPU's utilisation once a second while a run goes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stopped = threading.Event()

    def read(self) -> float | None:
        try:
            return float(torch.cuda.utilization())
        except Exception:  # no pynvml: ask nvidia-smi
            import subprocess

            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                return float(out.stdout.split()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def stop(self) -> float | None:
        self.stopped.set()
        self.join()
        return sum(self.samples) / len(self.samples) if self.samples else None


def sync_debug_observer():
    from forwardflow.pipeline.training import RunObserver

    class SyncDebug(RunObserver):
        """Arms torch.cuda.set_sync_debug_mode("error") after the warm-up, disarms it at the end."""

        def __init__(self):
            self.submitted = 0

        def after_submit(self, executor, progress) -> None:
            self.submitted += 1
            if self.submitted == WARMUP_MICROBATCHES:
                torch.cuda.set_sync_debug_mode("error")

        def on_end(self, result) -> None:
            torch.cuda.set_sync_debug_mode(0)

    return SyncDebug()


def where_it_synchronised(error: BaseException) -> str:
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if "forwardflow" in f.filename or "/pipeline/" in f.filename
    ]
    place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    return f"{str(error).splitlines()[0]}{place}"


def forwardflow_run(argv: list[str], cuda: bool, sync_debug: bool, profiled=None) -> dict[str, Any]:
    from forwardflow.launch.build import build_run
    from forwardflow.launch.cli import parse_config

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meter = Utilisation() if cuda else None
    observers = ([sync_debug_observer()] if sync_debug else []) + ([profiled] if profiled is not None else [])
    row: dict[str, Any] = {"sync": "armed after 20 microbatches: no unsanctioned sync" if sync_debug else "-"}
    with build_run(parse_config(argv + ["--no-progress"]), observers) as run:
        if meter is not None:
            meter.start()
        try:
            result = run.train()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            utilisation = meter.stop() if meter is not None else None
        samples = len(run.schedule.dataset.train_y) * run.config.schedule.epochs
    row.update(
        samples_per_s=result.train_samples_per_s,
        wall_s=result.wall_s,
        samples=samples,
        busy=[stage.busy_s / result.wall_s for stage in result.stages],
        utilisation=utilisation,
        peak_bytes=max(stage.peak_memory_bytes for stage in result.stages),
        accuracy=result.evaluations[-1].accuracy if result.evaluations else None,
        hand_off=f"{run.locations[0].hand_off} ({run.locations[0].hand_off_reason})",
    )
    if cuda:
        row["peak_bytes"] = max(row["peak_bytes"], torch.cuda.max_memory_allocated())
    return row


def sized(base: list[str], rate: float, seconds: float, train_size: int, batch: int) -> list[str]:
    """``base`` with the epochs or training samples that take about ``seconds`` at ``rate``."""
    samples = rate * seconds
    if samples >= train_size:
        return base + ["--epochs", str(max(1, round(samples / train_size)))]
    return base + ["--epochs", "1", "--train-limit", str(max(20 * batch, int(samples)))]


def checked_run(name: str, argv: list[str], cuda: bool, profiled=None) -> dict[str, Any]:
    """A forwardflow run under the sync debug mode where CUDA is; if it stops on a sync, the place
    is reported and the run repeated without the mode for its figures."""
    try:
        row = forwardflow_run(argv, cuda, sync_debug=cuda, profiled=profiled)
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        print(f"{name}: stopped by the sync debug mode: {where_it_synchronised(error)}", file=sys.stderr)
        row = forwardflow_run(argv, cuda, sync_debug=False)
        row["sync"] = "FAILED: " + where_it_synchronised(error)
    return row


def plain_backprop(args, data_dir: str, seconds: float, device: torch.device) -> dict[str, Any]:
    """The same net, trained end to end by a hand-written loop: data, augmentation and every step
    on the GPU, the preset's bf16 and channels-last, no host read until the end."""
    import torch.nn.functional as F
    from torch import nn

    from forwardflow.launch.cli import parse_config
    from forwardflow.pipeline.data import load_dataset
    from forwardflow.pipeline.device import uses_bfloat16
    from forwardflow.pipeline.model import build_stage_blocks, plan_stages
    from forwardflow.pipeline.source import augment_images

    config = parse_config(preset_argv(args, data_dir))
    data = load_dataset(config.data, config.seed)
    cuda = device.type == "cuda"
    execution = config.execution
    bf16 = uses_bfloat16(device, execution.bf16)  # the preset's, where a forwardflow stage would use it
    spec = plan_stages(config.model, data.input_shape, 1)[0]
    net = nn.Sequential(*build_stage_blocks(spec), nn.Flatten(), nn.Linear(int(np.prod(spec.output_shape)), 10))
    net = net.to(device)
    if cuda and execution.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(net.parameters(), lr=config.optim.lr, fused=True)
    images, labels = data.train_x.to(device), data.train_y.to(device)
    batch, count = config.schedule.batch_size, len(labels)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meter = Utilisation() if cuda else None
    warmup, limit = (1, 3) if args.tiny else (10, None)  # timing starts after a warm-up
    steps, started = -warmup, 0.0

    def done() -> bool:
        return steps > 0 and (time.perf_counter() - started >= seconds or (limit is not None and steps >= limit))

    while not done():
        order = torch.randperm(count, device=device)
        for first in range(0, count - batch + 1, batch):
            rows = order[first : first + batch]
            crops = torch.randint(0, 9, (batch, 2), device=device)
            flips = torch.rand(batch, device=device) < 0.5
            inputs = augment_images(images[rows], crops, flips)
            if cuda and execution.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(inputs), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 0:
                if cuda:
                    torch.cuda.synchronize()
                    assert meter is not None
                    meter.start()
                started = time.perf_counter()
            if done():
                break
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return {
        "samples_per_s": steps * batch / wall,
        "wall_s": wall,
        "busy": [],
        "utilisation": meter.stop() if meter is not None and meter.is_alive() else None,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "sync": "-",
        "accuracy": None,
    }


def preset_argv(args, data_dir: str) -> list[str]:
    preset = ["--preset", "cifar-vgg-small", "--batch-size", "64"] if args.tiny else ["--preset", "cifar-vgg"]
    return preset + ["--dataset", "cifar10", "--data-dir", data_dir, "--device", args.device]


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def ray_running() -> bool:
    return ray_available() and sys.modules["ray"].is_initialized()


RAY_RUN = "Signal Propagation, Ray, 2 stages on one device"
PLAIN = "plain PyTorch backprop loop"


def failed(error: BaseException) -> dict[str, Any]:
    """The row of a run that raised: the check goes on to the next run (one call on a GPU machine with a time limit)."""
    return {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}", "busy": []}


def measure(
    args, data_dir: str, device: torch.device, written, profiles: list
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every run in turn; ``written(rows, notes)`` after each, so that a check cut short by the
    machine's time limit still leaves the rows it finished. ``profiles`` gets a profile of each
    rule's sequential run (benchmarks/device_profile.py): of its calibration run, or of the tiny
    run itself."""
    from benchmarks.device_profile import StepProfile

    cuda = device.type == "cuda"
    base = preset_argv(args, data_dir)
    notes: list[str] = []
    runs = {
        "Signal Propagation, sequential": ["--executor", "sequential"],
        RAY_RUN: ["--executor", "ray", "--stages", "2"],
        RAY_RUN + ", object store": ["--executor", "ray", "--stages", "2", "--transport", "object-store"],
        "--rule bp, sequential": ["--executor", "sequential", "--rule", "bp"],
    }
    if args.no_ray or not ray_available():
        del runs[RAY_RUN], runs[RAY_RUN + ", object store"]
        notes.append(
            "Ray run skipped: "
            + ("--no-ray" if args.no_ray else "Ray cannot be imported here (../shared/gpu/README.md: carry a slim Ray)")
        )
    rows: dict[str, dict[str, Any]] = {}
    rates: dict[str, float] = {}
    ray_before = ray_running()
    for name, extra in runs.items():
        argv = base + extra
        rule = "bp" if "bp" in name else "sigprop"
        profiled = None
        if args.tiny:
            argv += ["--train-limit", "256", "--test-limit", "128", "--epochs", "1"]
            if "Ray" not in name:
                profiled = StepProfile(f"{name} (this tiny run)", start=2, count=2)
        print(f"device check: {name}: {' '.join(extra)}", file=sys.stderr)
        try:
            if not args.tiny:
                if rule not in rates:  # a short run gives the rate, and warms the device up
                    calibration = argv + ["--train-limit", "6400", "--test-limit", "1000", "--epochs", "1"]
                    profiles.append(StepProfile(f"{name} (its calibration run)", start=20, count=20))
                    rates[rule] = forwardflow_run(calibration, cuda, False, profiles[-1])["samples_per_s"]
                argv = sized(argv + ["--test-limit", "2000"], rates[rule], args.seconds, 50_000, 128)
            rows[name] = checked_run(name, argv, cuda and "Ray" not in name, profiled)
            profiles += [profiled] if profiled is not None else []
        except Exception as error:  # reported in the table; the next run goes on
            traceback.print_exc()
            rows[name] = failed(error)
        if "error" not in rows[name]:
            if "Ray" in name:
                rows[name]["sync"] = "not armed (the stages run in Ray's worker processes)"
                notes.append(f"{name}: stage 0 hands on by {rows[name]['hand_off']}")
            print(f"device check: {name}: {rows[name]['samples_per_s']:,.0f} samples/s", file=sys.stderr)
        written(rows, notes)
    if ray_running() and not ray_before:
        import ray

        ray.shutdown()  # the Ray the builder started for the run (not a caller's)
    try:
        rows[PLAIN] = plain_backprop(args, data_dir, args.seconds, device)
    except Exception as error:  # reported in the table
        traceback.print_exc()
        rows[PLAIN] = failed(error)
    return rows, notes


def report(rows: dict[str, dict[str, Any]], notes: list[str], header: dict[str, str]) -> str:
    plain = rows.get(PLAIN, {}).get("samples_per_s")
    lines = [
        "# Device check",
        "",
        *(f"- {key}: {value}" for key, value in header.items()),
        "",
        "| run | samples/s | vs plain loop | busy per stage | GPU utilisation | peak memory | sync debug mode |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | - | - | - | - | - |")
            continue
        versus = f"{row['samples_per_s'] / plain:.2f}x" if plain else "-"
        busy = ", ".join(f"{100 * b:.0f}%" for b in row["busy"]) or "-"
        utilisation = "-" if row["utilisation"] is None else f"{row['utilisation']:.0f}%"
        lines.append(
            f"| {name} | {row['samples_per_s']:,.0f} | {versus} | {busy} | {utilisation} | "
            f"{row['peak_bytes'] / 2**30:.2f} GiB | {row['sync']} |"
        )
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    lines += [
        "",
        "Targets (one GPU): SP sequential >= 0.8x the plain loop, every stage busy >= 80%; "
        "`--rule bp` >= 0.9x the plain loop; Ray on one GPU >= 0.9x sequential. Busy is device time "
        "(CUDA events) over the run's wall time; on a CPU, compute time.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/device_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=50.0, help="length of each run (default: 50)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "device.md"))
    parser.add_argument("--tiny", action="store_true", help="a check of seconds on the CPU (how the tests run it)")
    parser.add_argument("--device", default=None, help="default: cuda when there is one (cpu with --tiny)")
    parser.add_argument("--cifar", default=None, help="the CIFAR-10 JPEG archive (default: ../shared/datasets)")
    parser.add_argument("--no-ray", action="store_true", help="leave the Ray run out")
    parser.add_argument("--plain-checkout", action="store_true", help="import forwardflow through a package of links")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else ("cuda" if torch.cuda.is_available() else "cpu"))
    where = importable_forwardflow(force=args.plain_checkout)
    print(f"device check: forwardflow from {where}", file=sys.stderr)
    from benchmarks.common import machine, today, write_report
    from benchmarks.device_data import prepare_data

    device = torch.device(args.device)
    started = time.perf_counter()
    ray_version = sys.modules["ray"].__version__ if ray_available() else "absent"
    header = {
        "Date": today(),
        "Machine": machine(),
        "Ray": ray_version,
        "Net": "cifar-vgg preset (VGG7, microbatch 128, bf16, channels-last, copy streams)"
        if not args.tiny
        else "cifar-vgg-small preset (tiny CPU check, microbatch 64)",
        "Command": "python3 benchmarks/device_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }

    def written(rows: dict[str, dict[str, Any]], notes: list[str], final: bool = False) -> None:
        spent = f"{time.perf_counter() - started:.0f} s" + ("" if final else " so far (the check did not finish)")
        text = report(rows, notes, header | {"Total time": spent})
        if final:
            write_report(args.output, text)
        else:  # quietly, for a check cut short
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)

    with tempfile.TemporaryDirectory(prefix="forwardflow-device-check-") as work:
        header["Data"] = prepare_data(args, Path(work))
        print(f"device check: data: {header['Data']}", file=sys.stderr)
        profiles: list = []
        rows, notes = measure(args, work, device, written, profiles)
    if profiles:
        tables = Path(args.output).with_name(Path(args.output).stem + "-profile.md")
        tables.write_text(
            "# Device check: where a microbatch's time goes\n\n" + "\n".join(p.tables() for p in profiles)
        )
        notes += [profile.summary() for profile in profiles] + [f"the profiles' operator tables: {tables.name}"]
    written(rows, notes, final=True)
    return 1 if any("error" in row for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
