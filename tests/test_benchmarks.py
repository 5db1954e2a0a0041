"""The benchmarks run (with tiny budgets): their figures are measured on an idle machine, but the
scripts that produce them must not rot."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import device_check, overhead

REPO = Path(__file__).resolve().parent.parent


def test_overhead_benchmark_compares_the_executors_with_the_plain_loop(ray_cluster, tmp_path):
    output = tmp_path / "overhead.md"
    assert overhead.main(["--stages", "2", "--epochs", "1", "--repeats", "1", "--output", str(output)]) == 0
    text = output.read_text()
    for name in (overhead.PLAIN, overhead.SEQUENTIAL, overhead.RAY, overhead.RAY_SMALL_WINDOW):
        assert f"| 2 | {name} |" in text
    assert ray_cluster.is_initialized(), "the benchmark must leave a Ray it did not start running"


def test_device_check_runs_on_a_cpu_with_a_tiny_budget(ray_cluster, tmp_path):
    output = tmp_path / "device.md"
    assert device_check.main(["--tiny", "--output", str(output)]) == 0
    text = output.read_text()
    ray_runs = (device_check.RAY_RUN + " |", device_check.RAY_RUN + ", object store |")
    for run in ("Signal Propagation, sequential", *ray_runs, "--rule bp", "plain PyTorch"):
        assert f"| {run}" in text, run
    # Each Ray run says how its stages handed on (on a CPU: the object store either way).
    assert text.count("stage 0 hands on by object-store") == 2
    # Where the time goes: each rule's sequential run profiled, its operators in a file beside.
    assert "- Signal Propagation, sequential (this tiny run): 2 microbatches profiled: host " in text
    assert "- --rule bp, sequential (this tiny run): 2 microbatches profiled" in text
    profile = (tmp_path / "device-profile.md").read_text()
    assert profile.count("\n## ") == 2 and "aten::" in profile
    assert ray_cluster.is_initialized(), "the check must leave a Ray it did not start running"


def test_device_check_reports_a_failed_run_goes_on_and_leaves_what_it_finished(monkeypatch, tmp_path):
    # On a bare GPU machine the check is one call: a run that raises must not take the others with it,
    # and a check cut short by the machine's time limit must leave the rows it finished on disk.
    output = tmp_path / "device.md"
    real_run = device_check.checked_run

    def bp_fails(name, argv, cuda, profiled=None):
        if "--rule" in argv:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return real_run(name, argv, cuda, profiled)

    def plain_loop_sees_the_file_so_far(*args):
        so_far = output.read_text()
        assert "| Signal Propagation, sequential | " in so_far and "did not finish" in so_far
        raise KeyError("plain loop")

    monkeypatch.setattr(device_check, "checked_run", bp_fails)
    monkeypatch.setattr(device_check, "plain_backprop", plain_loop_sees_the_file_so_far)
    assert device_check.main(["--tiny", "--no-ray", "--output", str(output)]) == 1
    text = output.read_text()
    assert "| --rule bp, sequential | failed: RuntimeError: CUDA error: an illegal memory access" in text
    assert "| plain PyTorch backprop loop | failed: KeyError: 'plain loop' |" in text
    assert "| Signal Propagation, sequential | " in text and "did not finish" not in text


# Runs the check where only torch and numpy can be imported, from the checkout through a package of
# links (as on the GPU machine, which has no install of forwardflow and no Ray).
WITHOUT_EXTRAS = r"""
import runpy, sys
BLOCKED = {"ray", "prometheus_client", "tqdm", "PIL", "matplotlib", "grafana_foundation_sdk", "yaml", "torchvision"}
for name in BLOCKED:
    sys.modules[name] = None  # import raises ImportError; importlib.util.find_spec answers None
sys.argv = ["benchmarks/device_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/device_check.py", run_name="__main__")
"""


def test_device_check_needs_only_torch_and_numpy_and_no_install(tmp_path):
    output = tmp_path / "device.md"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS, "--tiny", "--plain-checkout", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "forwardflow from " + tempfile.gettempdir() in done.stderr  # the package of links, not the install
    text = output.read_text()
    assert "Ray run skipped: Ray cannot be imported here" in text and "| --rule bp, sequential |" in text


def gpu_session(tmp_path, *parts: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    environment = os.environ | {"OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TINY": "1"} | env
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "run", *parts],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, (tmp_path / "out" / "session.md").read_text()


def test_the_gpu_session_script_runs_the_device_check_and_notes_each_part(tmp_path):
    # The script a bare GPU machine runs, tried on a CPU as it is before each use: CPU-sized, and
    # without the Ray runs (the check's own tests run those).
    done, session = gpu_session(tmp_path, "device", DEVICE_ARGS="--no-ray")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "- device check (python3 benchmarks/device_check.py --tiny" in session
    assert "--no-ray): exit 0 after" in session
    assert "| Signal Propagation, sequential |" in (tmp_path / "out" / "device.md").read_text()
    assert "test suite" not in session  # only the part named


def test_the_gpu_session_script_fails_when_a_part_is_cut_at_the_budget(tmp_path):
    done, session = gpu_session(tmp_path, "device", BUDGET="1")
    assert done.returncode == 1, session
    # Cut at the second left, or not started when setting up took that second: never a success.
    assert "(cut at its 1 s limit)" in session or "not run, the budget was spent" in session, session


def test_the_scaling_and_peer_benchmarks_measure_stages_from_the_stream():
    from helpers import small_config

    from benchmarks import peer, scaling_inputs

    costs = scaling_inputs.stage_costs(small_config(), steps=2, warmup=1)
    assert len(costs.compute_s) == 3 and all(seconds > 0 for seconds in costs.compute_s)
    assert costs.in_bytes[0] > 0 and all(size > 0 for size in costs.out_bytes)
    argv = ["--preset", "synthetic", "--executor", "sequential", "--device", "cpu", "--no-progress"]
    saved, queued = peer.forwardflow_saved_activations(argv, steps=2)
    assert len(saved) == len(queued) > 1 and all(size > 0 for size in saved + queued)


def test_the_scaling_model_reads_the_host_costs_of_a_real_ray_pipeline(ray_cluster):
    from benchmarks import scaling_inputs

    host = scaling_inputs.measure_host(2, epochs=3)
    # Each actor's CPU beyond its Stage.step, the driver's and the rest of the machine's: all read
    # from /proc for the actual processes, so none is zero on a run that moved 16 microbatches.
    assert 0 < host.actor_s < 0.1 and 0 < host.driver_s < 0.1 and 0 <= host.rest_s < 0.1


def test_the_scaling_model_times_each_stage_in_its_own_actor_all_at_once(ray_cluster):
    # On the shared Ray (the benchmark gives it a fresh process and a Ray of its own).
    from helpers import small_config

    from benchmarks import scaling_inputs

    inputs = scaling_inputs.stage_costs(small_config(), steps=1, warmup=0).first_inputs
    seconds = scaling_inputs.concurrent_compute(small_config(), inputs, 3)
    assert len(seconds) == 3 and all(0 < s < 1 for s in seconds)
    assert ray_cluster.is_initialized(), "a Ray it did not start must stay up"


def test_the_peer_benchmark_refuses_more_nccl_stages_than_gpus_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.peer", "--device", "cuda", "--stages", "2", "99"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "needs a GPU per stage (99 stages asked for" in done.stderr
