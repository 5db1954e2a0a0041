"""Where the stages go: the plan from the cluster's nodes (a GPU per stage, shares, pack and spread),
plans the cluster cannot hold refused before any actor starts, and every stage's device and node in
the start lines and in summary.json."""

from __future__ import annotations

import json

import pytest
from helpers import small_config, tweak
from ray.util.placement_group import placement_group, remove_placement_group

import forwardflow.actors.placement
import forwardflow.actors.ray_pipeline
from forwardflow.actors.placement import NodeResources, cluster_nodes, plan_placement
from forwardflow.launch.build import build_run
from forwardflow.launch.train import main
from forwardflow.pipeline.config import ExecutionConfig
from forwardflow.pipeline.validation import ConfigError


def nodes(*resources: tuple[float, float]) -> list[NodeResources]:
    """Fake nodes a, b, c, ... with (CPUs, GPUs)."""
    return [
        NodeResources(node_id=chr(ord("a") + i) * 56, address=f"10.0.0.{i + 1}", cpus=cpus, gpus=gpus)
        for i, (cpus, gpus) in enumerate(resources)
    ]


def plan(stages: int, cluster: list[NodeResources], **execution):
    return plan_placement(stages, ExecutionConfig(executor="ray", **execution), cluster)


def on(placements) -> str:
    """The node of each stage, as one letter per stage."""
    return "".join(p.node_id[0] for p in placements)


def test_cpu_stages_share_the_cpus_of_one_node():
    placements = plan(4, nodes((2, 0)), device="cpu")
    assert on(placements) == "aaaa"
    assert {(p.device, p.num_cpus, p.num_gpus) for p in placements} == {("cpu", 0.5, 0.0)}
    assert plan(3, nodes((2, 0)), device="cpu")[0].num_cpus == 0.6666  # rounded down: 3 shares fit in 2
    assert plan(2, nodes((16, 0)), device="cpu")[0].num_cpus == 1.0  # at most one CPU each


def test_a_gpu_per_stage_when_the_cluster_has_enough_shares_otherwise():
    whole = plan(4, nodes((8, 4)), device="cuda")
    assert on(whole) == "aaaa" and {(p.device, p.num_gpus) for p in whole} == {("cuda", 1.0)}
    # Across nodes: pack fills the node with most GPUs first, then the next.
    assert on(plan(4, nodes((8, 1), (8, 3)), device="cuda")) == "bbba"
    assert {p.num_gpus for p in plan(4, nodes((8, 1), (8, 3)), device="cuda")} == {1.0}
    # More stages than GPUs: equal shares that pack exactly (1/2 each, two per GPU).
    shared = plan(3, nodes((8, 2)), device="auto")
    assert on(shared) == "aaa" and {(p.device, p.num_gpus) for p in shared} == {("cuda", 0.5)}
    assert plan(4, nodes((8, 0), (8, 1)), device="auto")[0].node_id[0] == "b"  # the GPU node only


def test_spread_puts_contiguous_balanced_blocks_on_the_nodes():
    assert on(plan(3, nodes((1, 0), (1, 0)), device="cpu", placement="spread")) == "aab"
    assert on(plan(5, nodes((2, 0), (2, 0)), device="cpu", placement="spread")) == "aaabb"
    assert on(plan(2, nodes((2, 0), (2, 0), (2, 0)), device="cpu", placement="spread")) == "ab"
    blocks = plan(3, nodes((1, 0), (1, 0)), device="cpu", placement="spread")
    assert [p.num_cpus for p in blocks] == [0.5, 0.5, 1.0]  # each node's CPUs shared by its own stages
    gpus = plan(4, nodes((4, 1), (4, 1)), device="cuda", placement="spread")
    assert on(gpus) == "aabb" and {p.num_gpus for p in gpus} == {0.5}


def test_requested_amounts_are_reserved_where_they_fit():
    placements = plan(3, nodes((2, 0), (2, 0)), device="cpu", cpus_per_stage=1)
    assert on(placements) == "aab" and {p.num_cpus for p in placements} == {1.0}
    assert {p.num_gpus for p in plan(2, nodes((8, 2)), device="cuda", gpus_per_stage=0.25)} == {0.25}
    assert on(plan(3, nodes((8, 2)), device="cuda", gpus_per_stage=0.5)) == "aaa"


@pytest.mark.parametrize(
    "stages, cluster, execution, where, message",
    [
        (2, [(2, 0)], {"placement": "spread"}, "--placement", "2 or more nodes; this one has 1 node"),
        (1, [(2, 0), (2, 0)], {"placement": "spread"}, "--placement", "2 or more stages"),
        (3, [(2, 0)], {"cpus_per_stage": 1}, "--cpus-per-stage", "3 stages of 1 CPU each do not fit"),
        (3, [(1, 0), (1, 0)], {"cpus_per_stage": 1}, "--cpus-per-stage", "at most 2 fit"),
        (2, [(1, 0)], {"cpus_per_stage": 2}, "--cpus-per-stage", "at most 0 fit"),
        (3, [(8, 2)], {"device": "cuda", "gpus_per_stage": 1}, "--gpus-per-stage", "3 stages of 1 GPU each"),
        (2, [(8, 1)], {"device": "cuda", "gpus_per_stage": 2}, "--gpus-per-stage", "at most 0 fit"),
        (3, [(8, 1)], {"device": "cuda", "gpus_per_stage": 0.5}, "--gpus-per-stage", "at most 2 fit"),
        (2, [(8, 0)], {"device": "cuda"}, "--device", "has none"),
        (2, [(8, 1)], {"device": "cuda:1"}, "--device", "not cuda:N"),
        (2, [(8, 0)], {"device": "cpu", "gpus_per_stage": 1}, "--gpus-per-stage", "GPU runs only"),
    ],
)
def test_a_plan_the_cluster_cannot_hold_is_refused_naming_the_flag(stages, cluster, execution, where, message):
    execution = {"device": "cpu", **execution}
    with pytest.raises(ConfigError) as refused:
        plan(stages, nodes(*cluster), **execution)
    assert refused.value.where == where and message in refused.value.message, refused.value


def test_gpus_per_stage_is_a_fraction_or_whole_gpus_and_no_share_is_zero():
    with pytest.raises(ConfigError, match="--gpus-per-stage: must be at most 1 or a whole number"):
        ExecutionConfig(gpus_per_stage=1.5)
    for flag, name in (("--cpus-per-stage", "cpus_per_stage"), ("--gpus-per-stage", "gpus_per_stage")):
        with pytest.raises(ConfigError, match=f"{flag}: must be more than 0"):
            ExecutionConfig(**{name: 0})
    assert ExecutionConfig(gpus_per_stage=2).gpus_per_stage == 2


REFUSED_ON_THE_TEST_CLUSTER = [
    (["--placement", "spread"], "--placement", "spread needs a Ray cluster of 2 or more nodes"),
    (["--cpus-per-stage", "1.5"], "--cpus-per-stage", "2 stages of 1.5 CPU each do not fit the Ray cluster"),
    (["--gpus-per-stage", "1"], "--gpus-per-stage", "applies to GPU runs only"),
]


@pytest.mark.parametrize("flags, where, message", REFUSED_ON_THE_TEST_CLUSTER)
def test_the_real_cluster_refuses_before_any_actor_starts(
    ray_cluster, tmp_path, capsys, monkeypatch, flags, where, message
):
    def no_actors(*args, **kwargs):
        raise AssertionError("no actor may start for a plan the cluster cannot hold")

    monkeypatch.setattr(forwardflow.actors.ray_pipeline, "StageGroup", no_actors)
    groups = len(ray_cluster.util.placement_group_table())
    out = tmp_path / "run"
    argv = ["--preset", "synthetic", "--stages", "2", "--executor", "ray", "--no-progress", "--out", str(out)]
    assert main(argv + flags) == 2  # the shared test cluster: one node, 2 CPUs, no GPU
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"forwardflow: error: {where}: {message}"), lines
    assert len(ray_cluster.util.placement_group_table()) == groups and not out.exists()


def test_every_stage_reports_its_device_and_node(ray_cluster, tmp_path):
    config = tweak(small_config("ray"), schedule={"epochs": 1}, output={"out": str(tmp_path / "run")})
    with build_run(config) as run:
        result = run.train()
        calls = {"window": run.executor.window, "microbatches_per_call": run.executor.per_call}
    summary = run.finish(result)
    assert summary["ray_calls"] == calls  # what the driver really kept in flight and sent per call
    here = cluster_nodes()[0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"] == summary["stages"]
    assert [
        (s["device"], s["node_id"], s["node_address"], s["num_cpus"], s["num_gpus"]) for s in summary["stages"]
    ] == [("cpu", here.node_id, here.address, 0.6666, 0.0)] * 3


def test_resources_another_job_holds_stop_the_start_in_one_line(ray_cluster, monkeypatch, capsys):
    held = placement_group([{"CPU": ray_cluster.cluster_resources()["CPU"]}])  # every CPU, as another job
    ray_cluster.get(held.ready())
    monkeypatch.setattr(forwardflow.actors.placement, "PLACEMENT_TIMEOUT_S", 1)
    try:
        status = main(["--preset", "synthetic", "--executor", "ray", "--no-progress"])
    finally:
        remove_placement_group(held)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith("forwardflow: error: the Ray cluster could not reserve"), lines
