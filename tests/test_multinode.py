"""Several nodes for real: a two-node Ray cluster on this machine (two raylets with their own
resources, on loopback), started and stopped by the test in a process of its own, apart from the
suite's shared one-node instance. launch/train.py joins it with --address, as a user joins a
cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import assert_same_weights, run_to_end, small_config, tweak

from forwardflow.launch.local_cluster import local_cluster
from forwardflow.pipeline.config_files import config_to_dict

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300


def train(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "launch/train.py", "--no-progress", *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_spread_over_two_nodes_uses_both_and_trains_as_the_sequential_run(tmp_path):
    config = small_config("ray")  # 3 stages, one torch thread each: bit for bit with the sequential run
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config_to_dict(config)))
    out = tmp_path / "run"
    with local_cluster(nodes=2, cpus=1, gpus=1) as cluster:
        env = cluster.env
        address = ["--config", str(config_file), "--address", cluster.address]
        spread = train(address + ["--placement", "spread", "--out", str(out)], env)
        # The nodes advertise one GPU each (a resource only): 3 stages cannot have one each.
        too_many_gpus = train(
            address + ["--device", "cuda", "--gpus-per-stage", "1", "--out", str(tmp_path / "x")], env
        )
    assert spread.returncode == 0, spread.stderr[-3000:]
    head, worker = cluster.nodes
    summary = json.loads((out / "summary.json").read_text())
    # Contiguous blocks, the driver's node (the head) first: only one hop crosses nodes.
    assert [stage["node_id"] for stage in summary["stages"]] == [head, head, worker]
    assert [stage["num_cpus"] for stage in summary["stages"]] == [0.5, 0.5, 1.0]
    assert f"stage 2: cpu on node {worker[:8]} (127.0.0.2" in spread.stderr
    sequential = run_to_end(tweak(config, execution={"executor": "sequential"}))
    assert_same_weights(sequential.weights, torch.load(out / "weights.pt"))

    assert too_many_gpus.returncode == 2
    lines = too_many_gpus.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("forwardflow: error: --gpus-per-stage: 3 stages of 1 GPU each do not fit"), lines
    assert not (tmp_path / "x").exists()
